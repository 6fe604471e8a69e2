"""How `loraft inspect` shows its findings: rich tables for the terminal, inspect.json and PNG charts.

Kept apart from rank_diagnostics.py (the figures) because it changes for a different reason (layout).
The report folder is written to a temporary sibling and renamed into place, so it is never half-written.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lora_ft.artifacts.run_dir import atomic_dir
from lora_ft.errors import LoraftError
from lora_ft.model.rank_stats import (
    ADVICE, BALANCED, NO_UPDATE, SATURATED, SATURATED_FRACTION, UNUSED, UNUSED_FRACTION, GroupStats, changed_most,
)
from lora_ft.rank_diagnostics import GRAD_WINDOW, InspectResult

TOP_MODULES = 10
REPORT_FILES = ("inspect.json", "spectra.png", "update_norm_by_layer.png")


def render_summary(result: InspectResult, width: int = 120) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False)
    for part in _summary_parts(result):
        console.print(part, soft_wrap=isinstance(part, str))  # tables fit the width; sentences stay whole lines
    return buffer.getvalue().rstrip()


# ---------------------------------------------------------------------------------------------
# Terminal summary


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _verdict_counts(counts: dict[str, int]) -> str:
    return " ".join(f"{counts[v]} {v}" for v in (SATURATED, BALANCED, UNUSED, NO_UPDATE) if counts.get(v))


def _summary_parts(result: InspectResult) -> list:
    lora = result.lora
    rsl = ", rsLoRA" if lora.get("use_rslora") else ""
    parts: list = [
        f"adapter  {result.adapter_dir}  (r={lora.get('r')}, alpha={lora.get('lora_alpha')}{rsl}, {len(result.modules)} modules)",
        result.base_note,
        _group_table(result, "By module type", result.by_type, "type"),
    ]
    if result.by_layer:
        parts.append(_group_table(result, "By layer", result.by_layer, "layer"))
    parts.append(_top_modules_table(result))
    parts.append(
        f"changed most    module types: {', '.join(changed_most(list(result.by_type))[:3])}"
        + (f";  layers: {', '.join(changed_most(list(result.by_layer))[:3])}" if result.by_layer else "")
    )
    used = f" (median module uses {result.median_rank_used:.0%} of its rank)" if result.median_rank_used is not None else ""
    parts.append(
        f"verdict         {ADVICE[result.verdict]}{used}; thresholds: saturated >= {SATURATED_FRACTION:g}r, "
        f"largely unused <= {UNUSED_FRACTION:g}r"
    )
    g = result.gradients
    if g is None:
        parts.append("grad norms      (no grad_norm in metrics.jsonl)")
    else:
        spikes = ", ".join(f"step {s}: {v:.3g}" for s, v in g.spikes) or "none"
        ratio = f" x{g.trend_ratio:.2f}" if g.trend_ratio is not None else ""
        # The heuristic reads the first GRAD_WINDOW logged values; a short run logs fewer, and says so.
        scope = f"first {len(g.values)} logged" if len(g.values) >= GRAD_WINDOW else f"all {len(g.values)} logged (of the first {GRAD_WINDOW} the heuristic reads)"
        parts.append(
            f"grad norms      {scope}: max {g.max:.3g}, median {g.median:.3g}, {g.trend}{ratio}, spikes: {spikes}\n"
            f"                hint: {g.hint}\n                heuristic: {g.heuristic}"
        )
    c = result.comparison
    if c is not None:
        parts.append(
            f"against         {c.other} (r={c.other_rank:g}), {len(c.modules)} shared modules"
            f" ({c.only_here} only here, {c.only_there} only there)\n"
            f"                top-k column-space overlap {c.mean_overlap:.3f} (1 = same subspace, random ~ {c.mean_random:.3f}); "
            f"its update inside this one's column space {c.mean_other_in_this:.0%}, this inside its {c.mean_this_in_other:.0%}\n"
            f"                {c.reading}"
        )
    for row in result.trained_tokens:  # embedding rows trained beside LoRA (lora.train_tokens)
        moved = "" if row.change is None else f", moved {row.change:.3g} from the base's {row.norm_before:.3g}"
        parts.append(f"token row       {row.token} (id {row.id}) in {row.module}: norm {row.norm_after:.3g}{moved}")
    parts.extend(f"note            {n}" for n in result.notes)

    parts.extend(escape(f"advice          {line}") for f in result.advice for line in f.lines())
    return parts


def _table(title: str):
    return Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)


def _group_table(result: InspectResult, title: str, groups: tuple[GroupStats, ...], first: str):
    relative = result.mean_relative_norm is not None
    table = _table(title)
    table.add_column(first)
    for name in ("modules", "r", f"eff. rank @{result.energy:.0%}", "||dW||/||W||" if relative else "||dW|| (no base)"):
        table.add_column(name, justify="right")
    table.add_column("verdicts")
    for g in groups:
        value = g.mean_relative_norm if relative else g.mean_update_norm
        table.add_row(g.key, str(g.modules), f"{g.mean_rank:g}", f"{g.mean_effective_rank:.1f}", _fmt(value), _verdict_counts(g.verdicts))
    return table


def _top_modules_table(result: InspectResult):
    top = sorted(result.modules, key=lambda m: -(m.relative_norm if m.relative_norm is not None else m.update_norm))
    table = _table(f"Largest updates (top {min(TOP_MODULES, len(top))} of {len(top)})")
    table.add_column("module", no_wrap=True)
    for name in ("r", "eff. rank", "||dW||", "||dW||/||W||"):
        table.add_column(name, justify="right")
    table.add_column("top singular values", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for m in top[:TOP_MODULES]:
        head = " ".join(f"{v:.3g}" for v in m.singular_values[:3]) + (" ..." if len(m.singular_values) > 3 else "")
        table.add_row(m.module, str(m.rank), str(m.effective_rank), f"{m.update_norm:.3g}", _fmt(m.relative_norm), head, m.verdict)
    return table


# ---------------------------------------------------------------------------------------------
# Report folder


def write_report(result: InspectResult, out_dir: str | Path) -> Path:
    """inspect.json and two charts, written into a temporary sibling folder and renamed into place."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(p.name not in REPORT_FILES for p in out.iterdir())):
        raise LoraftError(f"--report: {out} exists and holds other files; choose a new folder")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "inspect.json").write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
        _plot_spectra(result, tmp / "spectra.png")
        _plot_layers(result, tmp / "update_norm_by_layer.png")
    return out


def _pyplot():
    import matplotlib  # lazy: matplotlib.use must run before pyplot loads; only when a chart is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    return plt


def _plot_spectra(result: InspectResult, path: Path) -> None:
    """Mean normalised spectrum (s_i / s_1) per module type: a flat curve is a saturated rank, a cliff an unused one."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    for g in result.by_type:
        spectra = [torch.tensor(m.singular_values) for m in result.modules if m.module_type == g.key and m.update_norm > 0]
        if not spectra:
            continue
        length = min(len(s) for s in spectra)
        mean = torch.stack([s[:length] / s[0] for s in spectra]).mean(0)
        ax.plot(range(1, length + 1), mean.tolist(), marker=".", label=g.key)
    ax.set_yscale("log")
    _save_plot(plt, fig, ax, path, "singular value index", "s_i / s_1 (mean over layers)", "Update spectra by module type")


def _plot_layers(result: InspectResult, path: Path) -> None:
    relative = result.mean_relative_norm is not None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    for g in result.by_type:
        points = sorted((m.layer, m.relative_norm if relative else m.update_norm)
                        for m in result.modules if m.module_type == g.key and m.layer is not None)
        if points:
            ax.plot(*zip(*points), marker=".", label=g.key)
    ylabel = "||dW||_F / ||W||_F" if relative else "||dW||_F (base unavailable)"
    _save_plot(plt, fig, ax, path, "layer", ylabel, "Update norm per layer")


def _save_plot(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
