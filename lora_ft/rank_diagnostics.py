"""Rank diagnostics (`loraft inspect`): what an adapter learned, and whether its rank was the right size.

Reads a run folder (adapter_model.safetensors + adapter_config.json, metrics.jsonl if present, and
the base weights' norms when the base can be found) and reports, per adapted module, the update
ΔW = s·B·A relative to the frozen weight, its singular values, its effective rank against r and a
verdict (model/rank_stats.py, the figures train also records); then reads the early gradient norms,
compares two adapters' column spaces and reads the outcome against the advice recorded before training.
Writes nothing unless asked (rank_report.py: inspect.json + PNG charts).

The pitfall it guards: ΔW is never formed. The spectrum comes from thin QRs of B and Aᵀ and an SVD
of the r×r core (ΔW = s·Q_b (R_b R_aᵀ) Q_aᵀ), so memory stays O((out + in)·r) per module.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from lora_ft.artifacts.adapter import ModuleFactors, read_state
from lora_ft.artifacts.adapter_run import AdapterRun
from lora_ft.artifacts.findings import Finding
from lora_ft.artifacts.run_dir import METRICS
from lora_ft.errors import LoraftError
from lora_ft.model.coverage import WrappedParameter, wrappers_for_adapter
from lora_ft.model.loading import load_model_config
from lora_ft.model.rank_stats import (
    ADVICE, SATURATED, SATURATED_FRACTION, UNUSED, UNUSED_FRACTION, GroupStats, ModuleStats, changed_most, group,
    mean_relative_norm, module_stats, overall_verdict,
)
from lora_ft.model.spectra import DEFAULT_ENERGY, Comparison, compare, spectra_of
from lora_ft.model.stop_tokens import trained_rows
from lora_ft.model.weight_norms import base_weight_norms, uncached_hub_id
from lora_ft.training.advice import RunOutcome, after_run
from lora_ft.training.progress import read_metrics

# Gradient-norm heuristics on the first logged values. The first logged step is left out of the
# spike test: with B = 0 at the start and the loss at its highest, it is the largest by nature.
GRAD_WINDOW = 10
SPIKE_FACTOR = 5.0
LOSS_FALLS = 0.9  # growing grad norms are no alarm while the loss's second half is below this x its first half
TREND_FACTOR = 2.0  # geometric mean of the window's second half vs first half: above -> growing, below 1/x -> shrinking
TINY_UPDATE = 1e-3  # mean ||ΔW||/||W|| below this: the adapter barely moved the weights
HUGE_UPDATE = 1.0  # above this the update outweighs the pretrained weight itself (seen at lr 0.5 on the tiny model: 115)
HEURISTIC = (
    f"first {GRAD_WINDOW} logged grad norms; spike = a value after the first above {SPIKE_FACTOR:g}x their median; "
    f"growing/shrinking = second half's geometric mean above {TREND_FACTOR:g}x / below 1/{TREND_FACTOR:g} of the first's. "
    f"Non-finite, growing (unless the loss falls {1 - LOSS_FALLS:.0%} over the same steps), 2+ spikes or mean ||dW||/||W|| above {HUGE_UPDATE:g} -> learning rate or alpha too high; "
    f"mean ||dW||/||W|| under {TINY_UPDATE:g} with finite gradients -> scaling (alpha/r) or learning rate too low."
)


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class InspectResult:
    adapter_dir: Path
    energy: float
    lora: dict  # r, alpha, use_rslora, use_dora as configured
    base_note: str
    modules: tuple[ModuleStats, ...]
    by_type: tuple[GroupStats, ...]
    by_layer: tuple[GroupStats, ...]
    verdict: str
    median_rank_used: float | None
    gradients: GradientReport | None
    comparison: Comparison | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    trained_tokens: tuple = ()  # stop_tokens.TrainedRow: embedding rows trained with the adapter (lora.train_tokens)
    advice: tuple[Finding, ...] = ()  # what the run did, read against the advice recorded before it (training.advice)

    @property
    def mean_relative_norm(self) -> float | None:
        return mean_relative_norm(self.modules)

    def to_json(self) -> dict:
        return {
            "adapter_dir": str(self.adapter_dir),
            "energy": self.energy,
            "lora": self.lora,
            "base": self.base_note,
            "verdict": self.verdict,
            "advice": ADVICE[self.verdict],
            "median_rank_used": self.median_rank_used,
            "thresholds": {"saturated_at": SATURATED_FRACTION, "unused_at": UNUSED_FRACTION},
            "mean_relative_norm": self.mean_relative_norm,
            "changed_most": {"module_types": changed_most(list(self.by_type)), "layers": changed_most(list(self.by_layer))},
            "by_module_type": [g.to_json() for g in self.by_type],
            "by_layer": [g.to_json() for g in self.by_layer],
            "gradients": self.gradients.to_json() if self.gradients else None,
            "comparison": self.comparison.to_json() if self.comparison else None,
            "notes": list(self.notes),
            "trained_tokens": [t.to_json() for t in self.trained_tokens],
            "advice_after_run": [f.model_dump(mode="json") for f in self.advice],
            "modules": [m.to_json() for m in self.modules],
        }


def inspect_adapter(
    adapter_dir: str | Path,
    *,
    against: str | Path | None = None,
    base: str | None = None,
    energy: float = DEFAULT_ENERGY,
    console=None,
) -> InspectResult:
    """Per-module spectra, effective ranks and verdicts of an adapter; its gradient-norm history; optionally
    its subspace overlap with a second adapter `against`. `base` overrides the base recorded for ||W||."""
    if not 0 < energy <= 1:
        raise LoraftError(f"--energy: {energy} is not in (0, 1]; use e.g. 0.9 for 90% of the squared spectrum")
    console = console or _default_console()
    run, factors, spectra = _read_adapter(adapter_dir, "ADAPTER_DIR")
    with console.status("reading base weight norms"):
        norms, base_note = base_weight_norms(run, {m: f.shape for m, f in factors.items()}, base)
    stats = {m: module_stats(factors[m], spectra[m], norms.get(m), energy) for m in factors}
    modules = list(stats.values())
    verdict, median = overall_verdict(modules)
    comparison = None
    if against is not None:
        other, other_factors, other_spectra = _read_adapter(against, "--against")
        theirs = {m: (other_spectra[m], module_stats(f, other_spectra[m], None, energy)) for m, f in other_factors.items()}
        comparison = compare({m: (spectra[m], stats[m]) for m in stats}, theirs, str(other.path))
    history = read_metrics(run.path / METRICS)
    gradients = gradient_report(history, mean_relative_norm(modules))
    return InspectResult(
        adapter_dir=run.path,
        energy=energy,
        lora=run.adapter.summary(),
        base_note=base_note,
        modules=tuple(modules),
        by_type=tuple(group(modules, lambda m: m.module_type)),
        by_layer=tuple(group(modules, lambda m: m.layer)),
        verdict=verdict,
        median_rank_used=median,
        gradients=gradients,
        comparison=comparison,
        notes=tuple(_notes(run, factors, modules)),
        trained_tokens=tuple(_trained_token_rows(run, base)),
        advice=advice_after(run, modules, gradients, history),
    )


def advice_after(run, modules: list[ModuleStats], gradients: GradientReport | None, history: list[dict]) -> tuple[Finding, ...]:
    """inspect's reading of the run against the advice its manifest recorded (none for a foreign adapter: then
    the outcome alone, against no prior advice)."""
    recorded = run.manifest.advice if run.manifest is not None else None
    verdict, median = overall_verdict(modules)
    rank = run.adapter.rank
    outcome = run_outcome(rank, verdict, median, mean_relative_norm(modules), gradients, history)
    return after_run(outcome, recorded.before if recorded else (), recorded.off if recorded else ())


def run_outcome(rank: int, verdict: str, median: float | None, relative: float | None, gradients: GradientReport | None,
                history: list[dict]) -> RunOutcome:
    """What the run did, in the terms training.advice reads (its thresholds are this module's)."""
    update = None if relative is None else "tiny" if relative < TINY_UPDATE else "huge" if relative > HUGE_UPDATE else "fine"
    high = gradients is not None and (gradients.nonfinite_step is not None or gradients.trend == "growing" or len(gradients.spikes) >= 2)
    return RunOutcome(
        rank=rank,
        rank_verdict=verdict,
        saturated=verdict == SATURATED,
        unused=verdict == UNUSED,
        median_rank_used=median,
        update=update,
        relative_norm=relative,
        gradients_too_high=gradients.hint if high else None,
        losses=tuple(float(h["loss"]) for h in history if h.get("loss") is not None),
        evals=tuple((float(h.get("epoch") or 0), float(h["eval_loss"])) for h in history if h.get("eval_loss") is not None),
    )


def _trained_token_rows(run, base: str | None) -> list:
    """Rows of stop/turn tokens the adapter trained, beside what they were in the base (when it can be read)."""
    if not run.adapter.trainable_token_indices:
        return []
    source = None
    name = base or run.base_name
    if name and not uncached_hub_id(name):
        try:
            _, source, _ = run.resolve_base(base)
        except LoraftError:
            pass
    return trained_rows(run, read_state(run.path, "ADAPTER_DIR")[1], source)


def _default_console():
    return Console(stderr=True, soft_wrap=True)  # a warning stays one line when piped


def _read_adapter(path: str | Path, what: str):
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LoraftError(f"{what}: {folder} is not a folder; pass a run folder written by loraft train")
    if not (folder / "adapter_config.json").is_file():
        raise LoraftError(f"{what}: {folder} holds no adapter (no adapter_config.json); pass a run folder written by loraft train")
    run = AdapterRun.load(folder, what)
    factors = run.weights(adapter_wrappers(run), what).modules(embeddings=False)
    if not factors:
        raise LoraftError(f"{what}: {folder}/adapter_model.safetensors holds no lora_A/lora_B weights; is it a LoRA adapter?")
    return run, factors, spectra_of(factors)


def _notes(run, factors: dict[str, ModuleFactors], stats: list[ModuleStats]) -> list[str]:
    notes = []
    converted = run.manifest.lora.converted if run.manifest is not None else None
    if converted:
        notes.append(
            f"{converted['from']} adapter saved converted to rank {converted['saved_rank']} (2 x {converted['trained_rank']}): "
            "the trained update minus the initial one, on the original base; verdicts use r = "
            f"{converted['saved_rank']} and the scaling alpha/r is unchanged"
        )
    if run.adapter.use_dora:
        notes.append("DoRA adapter: figures describe the direction update s*B*A; the learned magnitude vector is not included")
    relative = mean_relative_norm(stats)
    if relative is not None and relative < TINY_UPDATE:
        notes.append(f"the update is tiny ({relative:.1e} of the weights): its spectrum may still be A's random "
                     "initialisation rather than anything learned, so read the rank verdicts with care")
    ranks = {f.rank for f in factors.values()}
    if len(ranks) > 1:
        notes.append(f"ranks differ per module (rank_pattern): {sorted(ranks)}; verdicts use each module's own r")
    return notes


def adapter_wrappers(run) -> dict:
    """The ParamWrapper layout of a run's adapter (LoRA on fused expert / router parameters): from its
    manifest, else rebuilt on the base's meta model; {} for an ordinary adapter."""
    if not run.adapter.target_parameters:
        return {}
    recorded = run.manifest.lora.parameter_wrappers if run.manifest is not None else None
    if recorded:
        return {k: WrappedParameter(**{**v, "shape": tuple(v["shape"])}) for k, v in recorded.items()}
    try:
        spec, source, _ = run.resolve_base(None, force=True)
        return wrappers_for_adapter(load_model_config(spec, source), run.adapter_config, spec.trust_remote_code)
    except LoraftError as exc:
        raise LoraftError(f"adapter: its LoRA on expert parameters needs the base model's config to be read ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Gradient norms from metrics.jsonl


@dataclass(frozen=True)
class GradientReport:
    steps: tuple[int, ...]
    values: tuple[float, ...]
    max: float
    median: float
    spikes: tuple[tuple[int, float], ...]
    trend: str  # growing, "growing while the loss falls" (no alarm), shrinking, steady
    trend_ratio: float | None
    nonfinite_step: int | None
    hint: str
    heuristic: str = HEURISTIC

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["spikes"] = [list(s) for s in self.spikes]
        return data


def _loss_falls(history: list[dict], steps: set[int]) -> bool:
    """The logged train loss over `steps` ends below LOSS_FALLS x where it began (halves compared)."""
    losses = [float(h["loss"]) for h in history if int(h.get("step", 0)) in steps and h.get("loss") is not None]
    losses = [x for x in losses if math.isfinite(x)]
    if len(losses) < 4:
        return False
    half = len(losses) // 2
    return statistics.fmean(losses[-half:]) < LOSS_FALLS * statistics.fmean(losses[:half])


def gradient_report(history: list[dict], relative_update: float | None) -> GradientReport | None:
    logged = [(int(h.get("step", 0)), float(h["grad_norm"])) for h in history if h.get("grad_norm") is not None]
    if not logged:
        return None
    nonfinite = next((step for step, g in logged if not math.isfinite(g)), None)
    window = [(s, g) for s, g in logged[:GRAD_WINDOW] if math.isfinite(g)]
    values = [g for _, g in window]
    median = statistics.median(values) if values else float("nan")
    spikes = tuple((s, g) for s, g in window[1:] if median > 0 and g > SPIKE_FACTOR * median)
    trend, ratio = "steady", None
    if len(values) >= 4 and min(values) > 0:
        half = len(values) // 2
        ratio = math.exp(statistics.fmean(map(math.log, values[-half:])) - statistics.fmean(map(math.log, values[:half])))
        trend = "growing" if ratio > TREND_FACTOR else "shrinking" if ratio < 1 / TREND_FACTOR else "steady"
    if trend == "growing" and _loss_falls(history, {s for s, _ in window}):
        # LoRA starts with B = 0, so A's gradient starts at zero and norms grow as B does: with the loss falling
        # over the same steps that is the run getting going, not a step too large.
        trend = "growing while the loss falls"
    if nonfinite is not None:
        hint = f"grad norm is not finite at step {nonfinite}: learning rate or alpha too high; lower training.learning_rate or lora.alpha"
    elif trend == "growing" or len(spikes) >= 2:
        hint = ("grad norms grow or spike in the first steps: learning rate or alpha likely too high; "
                "lower training.learning_rate or lora.alpha, or lengthen warmup")
    elif relative_update is not None and relative_update > HUGE_UPDATE:
        hint = (f"the update is {relative_update:.3g}x the size of the weights it adapts: learning rate or alpha likely too high; "
                "lower training.learning_rate or lora.alpha")
    elif relative_update is not None and relative_update < TINY_UPDATE:
        hint = (f"the update is only {relative_update:.1e} of the weights while gradients are finite: scaling (alpha/r) "
                "or learning rate likely too low; raise lora.alpha (or use_rslora at high rank) or training.learning_rate")
    else:
        hint = "no sign of an alpha or learning-rate problem"
    return GradientReport(
        steps=tuple(s for s, _ in window), values=tuple(values), max=max(values, default=float("nan")), median=median,
        spikes=spikes, trend=trend, trend_ratio=ratio, nonfinite_step=nonfinite, hint=hint,
    )
