"""What `loraft eval` reports: the base-vs-adapter figures as a terminal table, report.json, report.md and
report.png (`EvalReport.write`, all or nothing), and which gates the exit code was decided on.

evaluate.py measures and fills the report; this module only renders it, so a change to how a result reads
never touches how it is measured. A per-example loss change within TIE_NATS is a tie in both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora_ft.artifacts.run_dir import atomic_dir, require_new_out
from lora_ft.errors import EXIT_GATE
from lora_ft.metrics import GENERATION_METRICS

# A per-example loss change within this many nats/token is a tie: LoRA always moves the loss a little.
TIE_NATS = 0.05


@dataclass(frozen=True)
class EvalReport:
    adapter: str
    base: str
    base_matches: bool | None
    settings: dict  # includes base_weights: "full precision" or "4-bit nf4, as trained"
    task: dict  # {"sources", "rows", "metrics": {name: {base, adapter, delta, n}}, "examples": [...]}
    regression: dict | None  # {"sources", "rows", "mean_delta", "wins", "losses", "ties", "metrics", "worst", ...}
    failures: list[str]
    gates: dict

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else EXIT_GATE

    def summary(self) -> str:
        weights = self.settings.get("base_weights", "full precision")
        lines = [f"adapter {self.adapter}", f"base    {self.base} ({weights})" + ("  (fingerprint NOT matching: --force)" if self.base_matches is False else "")]
        lines.append("")
        lines.append(f"{'metric':<22}{'base':>10}{'adapter':>10}{'delta':>10}{'rows':>7}")
        for name, row in self.task["metrics"].items():
            lines.append(_table_line(name, row))
        if self.regression:
            r = self.regression
            lines.append("")
            lines.append(f"regression set ({r['rows']} rows: {', '.join(r['sources'])})")
            for name, row in r["metrics"].items():
                lines.append(_table_line(name, row))
            lines.append(
                f"per-example loss: adapter better on {r['wins']}, worse on {r['losses']}, tied on {r['ties']} "
                f"(tie = within {TIE_NATS} nats/token); mean change {r['mean_delta']:+.4f} nats/token "
                f"(gate: at most {self.gates['max_regression']:+.4f})"
            )
            for worst in r["worst"][:3]:
                lines.append(
                    f"  worse by {worst['delta']:+.3f}  {worst['where']}: {_short(worst['prompt'])!r}  "
                    f"base {_short(worst.get('base_output', ''))!r}  adapter {_short(worst.get('adapter_output', ''))!r}"
                )
        lines.append("")
        checked = self.gates_checked()
        if self.failures:
            lines += [f"GATE FAILED: {reason}" for reason in self.failures]
            lines.append(f"gates checked: {'; '.join(checked)}")
        elif checked:
            lines.append(f"gates passed: {'; '.join(checked)}")
        else:
            lines.append("no gates ran: add --min-<metric> X (e.g. --min-exact-match 0.9) or a regression set")
        return "\n".join(lines)

    def gates_checked(self) -> list[str]:
        """Each gate that ran, with the adapter's figure: what the exit code was decided on."""
        checked = []
        for name, minimum in self.gates["minimums"].items():
            row = self.task["metrics"].get(name)
            checked.append(f"{name} >= {minimum:g} (adapter {row['adapter']:.4f})" if row else f"{name} >= {minimum:g} (no rows)")
        if self.regression and self.regression.get("deltas"):
            checked.append(f"regression mean loss change <= {self.gates['max_regression']:+g} ({self.regression['mean_delta']:+.4f})")
        return checked

    def to_json(self) -> dict:
        return {
            "adapter": self.adapter,
            "base": self.base,
            "base_fingerprint_matches": self.base_matches,
            "settings": self.settings,
            "task": self.task,
            "regression": self.regression,
            "gates": {**self.gates, "passed": self.passed, "failures": self.failures, "exit_code": self.exit_code},
        }

    def write(self, out: str | Path) -> Path:
        """report.json, report.md and report.png in a new folder `out`, all or nothing (a temp folder renamed into place)."""
        out = require_new_out(out)
        with atomic_dir(out) as tmp:
            (tmp / "report.json").write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            (tmp / "report.md").write_text(self.markdown(), encoding="utf-8")
            self.chart(tmp / "report.png")
        return out

    def markdown(self) -> str:
        lines = [f"# loraft eval: `{Path(self.adapter).name}` vs its base", "", f"- adapter: `{self.adapter}`", f"- base: `{self.base}`"]
        lines += [f"- task data: {', '.join(self.task['sources'])} ({self.task['rows']} rows)"]
        lines += [f"- result: **{'passed' if self.passed else 'FAILED'}**" + "".join(f"\n  - {f}" for f in self.failures), ""]
        lines += ["| metric | base | adapter | delta | rows |", "|---|---:|---:|---:|---:|"]
        lines += [_md_line(name, row) for name, row in self.task["metrics"].items()]
        if self.regression:
            r = self.regression
            lines += ["", f"## Regression set ({r['rows']} rows)", "", "| metric | base | adapter | delta | rows |", "|---|---:|---:|---:|---:|"]
            lines += [_md_line(name, row) for name, row in r["metrics"].items()]
            lines += [
                "",
                f"Per-example loss: adapter better on **{r['wins']}**, worse on **{r['losses']}**, tied on **{r['ties']}** "
                f"(tie: within {TIE_NATS} nats/token). Mean change {r['mean_delta']:+.4f} nats/token; "
                f"gate {self.gates['max_regression']:+.4f}.",
                "",
                "### Worst regressions",
                "",
                "| where | loss change | prompt | reference | base output | adapter output |",
                "|---|---:|---|---|---|---|",
            ]
            lines += [
                f"| {w['where']} | {w['delta']:+.3f} | {_cell(w['prompt'])} | {_cell(w['reference'])} | "
                f"{_cell(w.get('base_output', ''))} | {_cell(w.get('adapter_output', ''))} |"
                for w in r["worst"]
            ]
        examples = [e for e in self.task["examples"] if "base_output" in e][:10]
        if examples:
            lines += ["", "## Task examples", "", "| where | reference | base output | adapter output |", "|---|---|---|---|"]
            lines += [f"| {e['where']} | {_cell(e['reference'])} | {_cell(e['base_output'])} | {_cell(e['adapter_output'])} |" for e in examples]
        return "\n".join(lines) + "\n"

    def chart(self, path: Path) -> None:
        import matplotlib  # lazy: matplotlib.use selects the process's backend; only when a chart is drawn

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: after the backend is chosen

        rates = {k: v for k, v in self.task["metrics"].items() if k in GENERATION_METRICS}
        if self.regression:
            rates.update({f"regr. {k}": v for k, v in self.regression["metrics"].items() if k in GENERATION_METRICS})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
        names = list(rates)
        xs = range(len(names))
        axes[0].bar([x - 0.2 for x in xs], [rates[n]["base"] for n in names], 0.4, label="base", color="tab:gray")
        axes[0].bar([x + 0.2 for x in xs], [rates[n]["adapter"] for n in names], 0.4, label="adapter", color="tab:blue")
        axes[0].set_xticks(list(xs), names, rotation=30, ha="right")
        axes[0].set_ylim(0, 1.05)
        axes[0].set_title("generation metrics (higher is better)")
        axes[0].legend()
        deltas = [d for d in (self.regression or {}).get("deltas", [])]
        if deltas:
            axes[1].hist(deltas, bins=20, color="tab:red", alpha=0.8)
            axes[1].axvline(0, color="black", linewidth=0.8)
            axes[1].set_title("regression set: per-example loss change")
            axes[1].set_xlabel("adapter - base (nats/token; > 0 is worse)")
        else:
            axes[1].axis("off")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def _table_line(name: str, row: dict) -> str:
    def fmt(value, sign=""):
        if value is None:
            return f"{'-':>10}"
        # a wrecked adapter's perplexity runs to 1e7+: keep the columns aligned
        return f" {value:>{sign}9.3g}" if abs(value) >= 1e5 else f" {value:>{sign}9.4f}"

    delta = fmt(row.get("delta"), "+")
    return f"{name:<22}{fmt(row['base'])}{fmt(row['adapter'])}{delta}{row['n']:>7}"


def _md_line(name: str, row: dict) -> str:
    def fmt(value):
        return "-" if value is None else f"{value:.4f}"

    delta = "-" if row.get("delta") is None else f"{row['delta']:+.4f}"
    return f"| {name} | {fmt(row['base'])} | {fmt(row['adapter'])} | {delta} | {row['n']} |"


def _short(text: str, n: int = 50) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(text) -> str:
    return _short(text, 120).replace("|", "\\|")
