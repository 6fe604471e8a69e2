"""Rank diagnostics: what an adapter learned, and whether its rank was the right size.

Reads a run folder (adapter_model.safetensors + adapter_config.json, metrics.jsonl if present, and
the base weights' norms when the base can be found) and reports, per adapted module, the update
ΔW = s·B·A relative to the frozen weight, its singular values, its effective rank against r and a
verdict; then aggregates by layer and module type, reads the early gradient norms, and compares two
adapters' column spaces. Writes nothing unless asked (`write_report`: inspect.json + PNG charts).

The pitfall it guards: ΔW is never formed. The spectrum comes from thin QRs of B and Aᵀ and an SVD
of the r×r core (ΔW = s·Q_b (R_b R_aᵀ) Q_aᵀ), so memory stays O((out + in)·r) per module.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from lora_ft.artifacts.adapter import AdapterConfig, AdapterRun, ModuleFactors, group_state, read_state
from lora_ft.errors import LoraftError
from lora_ft.model.speed import one_torch_thread
from lora_ft.training.advice import RunOutcome, after_run
from lora_ft.artifacts.findings import Finding

DEFAULT_ENERGY = 0.9
# Verdict thresholds on effective rank / r. With an energy threshold e the effective rank can be at
# most ceil(e·r) (a flat spectrum), so "≥ 0.9r" at e = 0.9 would fire only on a perfectly flat
# spectrum, i.e. almost never. At 0.75r the last quarter of the directions still carries more than
# 1 - e of the energy (a flat spectrum puts 25% there): the update is spending real weight on its
# last directions and would likely use more. At 0.25r, 90% of the update fits in a quarter of the
# directions, so an adapter of rank r/4 would keep it to within sqrt(0.1) ≈ 32% Frobenius error.
SATURATED_FRACTION = 0.75
UNUSED_FRACTION = 0.25
SATURATED, BALANCED, UNUSED, NO_UPDATE = "saturated", "balanced", "largely unused", "no update"
ADVICE = {
    SATURATED: "rank saturated: consider raising lora.rank",
    UNUSED: "rank largely unused: consider lowering lora.rank",
    BALANCED: "rank balanced: the update spreads over a fair share of its directions without filling them all",
    NO_UPDATE: "no update: B is zero (the adapter never trained)",
}
# Gradient-norm heuristics on the first logged values. The first logged step is left out of the
# spike test: with B = 0 at the start and the loss at its highest, it is the largest by nature.
GRAD_WINDOW = 10
SPIKE_FACTOR = 5.0
TREND_FACTOR = 2.0  # geometric mean of the window's second half vs first half: above -> growing, below 1/x -> shrinking
TINY_UPDATE = 1e-3  # mean ||ΔW||/||W|| below this: the adapter barely moved the weights
HUGE_UPDATE = 1.0  # above this the update outweighs the pretrained weight itself (seen at lr 0.5 on the tiny model: 115)
HEURISTIC = (
    f"first {GRAD_WINDOW} logged grad norms; spike = a value after the first above {SPIKE_FACTOR:g}x their median; "
    f"growing/shrinking = second half's geometric mean above {TREND_FACTOR:g}x / below 1/{TREND_FACTOR:g} of the first's. "
    f"Non-finite, growing, 2+ spikes or mean ||dW||/||W|| above {HUGE_UPDATE:g} -> learning rate or alpha too high; "
    f"mean ||dW||/||W|| under {TINY_UPDATE:g} with finite gradients -> scaling (alpha/r) or learning rate too low."
)
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer|decoder_layers)\.(\d+)\.")


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
    from lora_ft.training.progress import read_metrics
    from lora_ft.artifacts.run_dir import METRICS

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
    from lora_ft.model.stop_tokens import trained_rows

    if not run.adapter.trainable_token_indices:
        return []
    source = None
    name = base or run.base_name
    if name and not _uncached_hub_id(name):
        try:
            _, source, _ = run.resolve_base(base)
        except LoraftError:
            pass
    return trained_rows(run, read_state(run.path, "ADAPTER_DIR")[1], source)


def _default_console():
    from rich.console import Console

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


# ---------------------------------------------------------------------------------------------
# Per-module statistics (also what `train` records in the manifest)


@dataclass(frozen=True)
class ModuleStats:
    module: str
    module_type: str
    layer: int | None
    shape: tuple[int, int]  # (out, in)
    rank: int
    alpha: float
    scaling: float
    singular_values: tuple[float, ...]
    update_norm: float
    base_norm: float | None
    effective_rank: int
    verdict: str

    @property
    def relative_norm(self) -> float | None:
        return self.update_norm / self.base_norm if self.base_norm else None

    @property
    def rank_used(self) -> float:
        """Effective rank over the most it could be: r, or min(out, in) for a layer narrower than r."""
        return self.effective_rank / min(self.rank, *self.shape)

    def to_json(self) -> dict:
        return {
            "module": self.module, "module_type": self.module_type, "layer": self.layer, "shape": list(self.shape),
            "rank": self.rank, "alpha": self.alpha, "scaling": self.scaling,
            "update_norm": self.update_norm, "base_norm": self.base_norm, "relative_norm": self.relative_norm,
            "effective_rank": self.effective_rank, "verdict": self.verdict,
            "singular_values": [float(f"{v:.7g}") for v in self.singular_values],
        }


def module_stats(factors: ModuleFactors, spectrum: Spectrum, base_norm: float | None, energy: float) -> ModuleStats:
    effective = effective_rank(spectrum.values, energy)
    cap = min(factors.rank, *factors.shape)  # r cannot exceed min(out, in)
    return ModuleStats(
        module=factors.module,
        module_type=module_type(factors.module),
        layer=layer_index(factors.module),
        shape=factors.shape,
        rank=factors.rank,
        alpha=factors.alpha,
        scaling=factors.scale,
        singular_values=tuple(float(v) for v in spectrum.values),
        update_norm=spectrum.norm,
        base_norm=base_norm,
        effective_rank=effective,
        verdict=rank_verdict(effective, cap),
    )


@dataclass(frozen=True)
class GroupStats:
    """Modules sharing a layer index or a module type."""

    key: str
    modules: int
    mean_relative_norm: float | None
    mean_update_norm: float
    mean_effective_rank: float
    mean_rank: float
    verdicts: dict[str, int]

    def to_json(self) -> dict:
        return dict(self.__dict__)


def group(stats: list[ModuleStats], key) -> list[GroupStats]:
    buckets: dict[str, list[ModuleStats]] = {}
    for item in stats:
        k = key(item)
        if k is not None:
            buckets.setdefault(str(k), []).append(item)
    out = []
    for k, items in buckets.items():
        relative = [m.relative_norm for m in items if m.relative_norm is not None]
        verdicts: dict[str, int] = {}
        for m in items:
            verdicts[m.verdict] = verdicts.get(m.verdict, 0) + 1
        out.append(GroupStats(
            key=k,
            modules=len(items),
            mean_relative_norm=statistics.fmean(relative) if len(relative) == len(items) else None,
            mean_update_norm=statistics.fmean(m.update_norm for m in items),
            mean_effective_rank=statistics.fmean(m.effective_rank for m in items),
            mean_rank=statistics.fmean(m.rank for m in items),
            verdicts=verdicts,
        ))
    return sorted(out, key=lambda g: _natural(g.key))


def changed_most(groups: list[GroupStats]) -> list[str]:
    """Group keys, largest update first: by ||ΔW||/||W|| when known (comparable across shapes), else ||ΔW||."""
    if groups and all(g.mean_relative_norm is not None for g in groups):
        return [g.key for g in sorted(groups, key=lambda g: -g.mean_relative_norm)]
    return [g.key for g in sorted(groups, key=lambda g: -g.mean_update_norm)]


def mean_relative_norm(stats) -> float | None:
    """Mean ||ΔW||/||W|| over all modules; None unless every module has its base norm."""
    values = [m.relative_norm for m in stats if m.relative_norm is not None]
    return statistics.fmean(values) if values and len(values) == len(stats) else None


def overall_verdict(stats: list[ModuleStats]) -> tuple[str, float | None]:
    """The verdict of the median module (by effective rank / r), and that median fraction."""
    used = [m.rank_used for m in stats if m.verdict != NO_UPDATE]
    if not used:
        return NO_UPDATE, None
    median = statistics.median(used)
    return share_verdict(median), median


def adapter_statistics(
    adapter_dir_or_state: str | Path | Mapping[str, torch.Tensor],
    adapter_config: dict | None = None,
    base_weight_norms: Mapping[str, float] | None = None,
    *,
    energy: float = DEFAULT_ENERGY,
    wrappers: Mapping | None = None,
) -> dict:
    """Per-module rank statistics and their aggregates as plain JSON (what `train` puts in the manifest).

    `adapter_dir_or_state` is an adapter folder or a state dict with PEFT key names; `adapter_config`
    defaults to the folder's adapter_config.json; `base_weight_norms` maps module name -> ||W||_F.
    """
    stats = compute_module_stats(adapter_dir_or_state, adapter_config, base_weight_norms, energy=energy, wrappers=wrappers)
    verdict, median = overall_verdict(stats)
    by_type, by_layer = group(stats, lambda m: m.module_type), group(stats, lambda m: m.layer)
    return {
        "energy": energy,
        "verdict": verdict,
        "median_rank_used": median,
        "mean_relative_norm": mean_relative_norm(stats),
        "changed_most": {"module_types": changed_most(by_type), "layers": changed_most(by_layer)},
        "by_module_type": [g.to_json() for g in by_type],
        "by_layer": [g.to_json() for g in by_layer],
        "modules": [m.to_json() for m in stats],
    }


def compute_module_stats(adapter_dir_or_state, adapter_config=None, base_weight_norms=None, *, energy=DEFAULT_ENERGY,
                         wrappers=None):
    if isinstance(adapter_dir_or_state, (str, Path)):
        folder = Path(adapter_dir_or_state)
        _, state = read_state(folder)
        config = AdapterConfig.read(folder) if adapter_config is None else AdapterConfig.parse(adapter_config)
    else:
        state = adapter_dir_or_state
        if adapter_config is None:
            raise LoraftError("adapter_statistics: pass adapter_config with a state dict")
        config = AdapterConfig.parse(adapter_config)
    norms = base_weight_norms or {}
    factors = read_factors(state, config, wrappers)
    spectra = spectra_of(factors)
    return [module_stats(f, spectra[name], norms.get(name), energy) for name, f in factors.items()]


def model_weight_norms(peft_model) -> dict[str, float]:
    """||W||_F of each LoRA-wrapped layer's frozen weight, from a model in memory (4-/8-bit dequantized);
    for fused expert parameters (PEFT's ParamWrapper) one norm per expert, named as FusedFactors.per_expert names them."""
    from peft.utils.integrations import dequantize_module_weight

    from lora_ft.model.coverage import parameter_wrappers

    norms = {}
    with torch.no_grad():
        wrappers = parameter_wrappers(peft_model)
        for name, module in peft_model.get_base_model().named_modules():
            param = module.get_param() if name in wrappers else None
            if param is not None and type(param).__name__ != "DTensor":
                norms.update(_wrapped_norms(wrappers[name], param))
        for name, module in peft_model.named_modules():
            if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")) or type(module).__name__ == "ParamWrapper":
                continue
            # finalize runs on rank 0 alone: a sharded weight (FSDP2 DTensor, FSDP1 flat parameter, ZeRO-3
            # placeholder) would need a collective the other ranks never join, so it gets no norm.
            if type(module.base_layer.weight).__name__ == "DTensor":
                continue
            weight = dequantize_module_weight(module.base_layer)
            if weight.dim() == 2 and weight.numel() > 0:
                norms[name.removeprefix("base_model.model.")] = float(weight.float().norm())
    return norms


# ---------------------------------------------------------------------------------------------
# Reading factors


def original_weight_norms(model) -> dict[str, float]:
    """||W||_F of every nn.Linear of a model not yet wrapped: PiSSA/OLoRA replace W by a residual when the
    adapter is attached, and ||dW||/||W|| must compare with the weights the user gave."""
    with torch.no_grad():
        return {name: float(m.weight.float().norm()) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _wrapped_norms(wrapper, param: torch.Tensor) -> dict[str, float]:
    if wrapper.experts == 1:
        return {wrapper.parameter.removesuffix(".weight"): float(param.float().norm())}
    container, _, leaf = wrapper.parameter.rpartition(".")
    return {f"{container}.{e}.{leaf}": float(param[e].float().norm()) for e in range(wrapper.experts)}


def adapter_wrappers(run) -> dict:
    """The ParamWrapper layout of a run's adapter (LoRA on fused expert / router parameters): from its
    manifest, else rebuilt on the base's meta model; {} for an ordinary adapter."""
    from lora_ft.model.coverage import WrappedParameter, wrappers_for_adapter
    from lora_ft.model.loading import load_model_config

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


def read_factors(state: Mapping[str, torch.Tensor], adapter_config: AdapterConfig | Mapping, wrappers: Mapping | None = None) -> dict[str, ModuleFactors]:
    """PEFT keys -> per-module factors with their own r/alpha (rank_pattern, alpha_pattern, rsLoRA), through the one
    adapter reader (artifacts/adapter.py). A fused expert parameter (in `wrappers`) becomes one module per expert,
    `...experts.<e>.<name>`. Embedding LoRA is left out (its update is transposed and not a layer's rank question)."""
    config = adapter_config if isinstance(adapter_config, AdapterConfig) else AdapterConfig.parse(adapter_config)
    if config.target_parameters and wrappers is None:
        raise LoraftError("adapter: LoRA on expert parameters (target_parameters) needs their layout; pass wrappers")
    return group_state(state, config, wrappers).modules(embeddings=False)


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def module_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def layer_index(module: str) -> int | None:
    match = _LAYER.search(f".{module}.")
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# Linear algebra on the factors


@dataclass(frozen=True)
class Spectrum:
    """ΔW = left · diag(values) · rightᵀ, from the factors."""

    values: torch.Tensor  # (k,) float64, descending
    left: torch.Tensor  # (out, k) orthonormal columns: the update's column space
    right: torch.Tensor  # (in, k)

    @property
    def norm(self) -> float:
        return float(self.values.square().sum().sqrt())




def spectra_of(factors: Mapping[str, ModuleFactors]) -> dict[str, Spectrum]:
    with one_torch_thread():
        return {m: spectrum_from_factors(f.B, f.A, f.scale) for m, f in factors.items()}


def spectrum_from_factors(lora_b: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> Spectrum:
    """SVD of s·B·A (B: out×r, A: r×in) without forming it: B = Q_b R_b, Aᵀ = Q_a R_a, SVD of R_b R_aᵀ."""
    q_b, r_b = torch.linalg.qr(lora_b.detach().to("cpu", torch.float64))
    q_a, r_a = torch.linalg.qr(lora_a.detach().to("cpu", torch.float64).T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return Spectrum(s * abs(scaling), q_b @ u, q_a @ vh.T)


def effective_rank(values: torch.Tensor | list[float], energy: float = DEFAULT_ENERGY) -> int:
    """The fewest singular values holding `energy` of the squared spectrum (0 for a zero update)."""
    squares = torch.as_tensor(values, dtype=torch.float64).square()
    total = squares.sum()
    if total <= 0:
        return 0
    share = torch.cumsum(squares, 0) / total
    return int((share < energy - 1e-9).sum()) + 1  # tolerance: a planted 90% must not read as 89.99999%


def rank_verdict(effective: int, rank: int) -> str:
    return NO_UPDATE if effective == 0 else share_verdict(effective / rank)


def share_verdict(share: float) -> str:
    """Verdict on the share of its rank an update uses (effective rank / r)."""
    if share >= SATURATED_FRACTION:
        return SATURATED
    if share <= UNUSED_FRACTION:
        return UNUSED
    return BALANCED


def subspace_overlap(left_a: torch.Tensor, left_b: torch.Tensor, k: int) -> float:
    """||U_a[:, :k]ᵀ U_b[:, :k]||_F² / k: 1 for the same k-dim column space, about k/d for random ones."""
    k = max(1, min(k, left_a.shape[1], left_b.shape[1]))
    return float((left_a[:, :k].T @ left_b[:, :k]).square().sum() / k)


def energy_inside(spectrum: Spectrum, basis: Spectrum) -> float:
    """Share of `spectrum`'s squared norm that lies in the column space of `basis` (its nonzero directions)."""
    total = spectrum.values.square().sum()
    if total <= 0:
        return float("nan")
    keep = basis.values > basis.values.max() * 1e-6
    projected = (basis.left[:, keep].T @ spectrum.left).square().sum(0)  # each direction's share inside
    return float((projected * spectrum.values.square()).sum() / total)


# ---------------------------------------------------------------------------------------------
# Base weight norms, read from disk (shard by shard) or through transformers for a .gguf base


def base_weight_norms(run, shapes: Mapping[str, tuple[int, int]], base: str | None = None) -> tuple[dict[str, float], str]:
    """(||W||_F per module, a note saying where they came from or why they are missing). Never raises:
    an unavailable base only costs the relative norms."""
    name = base or run.base_name
    if not name:
        return {}, "base: the adapter records no base model (pass --base MODEL); ||dW||/||W|| not reported"
    if _uncached_hub_id(name):
        return {}, f"base: {name} is not in the local Hugging Face cache (pass --base PATH); ||dW||/||W|| not reported"
    try:
        spec, source, _ = run.resolve_base(base)
        if source.gguf_file is not None:
            named = _gguf_weights(spec, source)
        else:
            named = _safetensors_weights(Path(source.path))
        norms = _match_norms(named, shapes)
    except LoraftError as exc:
        return {}, f"base: {exc}; ||dW||/||W|| not reported"
    missing = len(shapes) - len(norms)
    note = f"base: {source.display}"
    if missing:
        note += f" ({missing} of {len(shapes)} modules have no dense weight of the right shape there)"
    return norms, note


def _uncached_hub_id(name: str) -> bool:
    """A Hub id we would have to download (gigabytes) just for its norms: not worth it for inspect."""
    import os

    if name.startswith(("pkg://", ".", "/", "~")) or os.path.exists(os.path.expanduser(name)) or name.endswith(".gguf"):
        return False
    from huggingface_hub import try_to_load_from_cache

    return not isinstance(try_to_load_from_cache(name, "config.json"), str)


def _safetensors_weights(model_dir: Path):
    """Yield (name, tensor) for every 2-D tensor, one shard open at a time."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LoraftError(f"{model_dir}: no .safetensors weights")
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight") and len(handle.get_slice(key).get_shape()) == 2:
                    yield key, handle.get_tensor(key)


def _gguf_weights(spec, source):
    """A .gguf base has no safetensors to read: transformers dequantizes it into a model, once."""
    from lora_ft.model.loading import load_base_model

    model = load_base_model(spec, source, "fp32")
    for key, tensor in model.state_dict().items():
        if tensor.dim() == 2:
            yield key, tensor
    del model


def _match_norms(named, shapes: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Base tensor `x.weight` belongs to adapter module `x`, allowing a differing prefix (model. vs none)."""
    by_tail = {}
    for module in shapes:
        parts = module.split(".")
        for i in range(len(parts)):
            by_tail.setdefault(".".join(parts[i:]), module)
    norms = {}
    for key, tensor in named:
        stem = key.removesuffix(".weight")
        parts = stem.split(".")
        module = next((by_tail[".".join(parts[i:])] for i in range(len(parts)) if ".".join(parts[i:]) in by_tail), None)
        if module is None or module in norms:
            continue
        # Packed 4-/8-bit storage or a shape that is not the module's: no honest norm to give.
        if tensor.dtype in (torch.uint8, torch.int8) or tuple(tensor.shape) not in (shapes[module], shapes[module][::-1]):
            continue
        norms[module] = float(tensor.float().norm())
    return norms


# ---------------------------------------------------------------------------------------------
# Gradient norms from metrics.jsonl


@dataclass(frozen=True)
class GradientReport:
    steps: tuple[int, ...]
    values: tuple[float, ...]
    max: float
    median: float
    spikes: tuple[tuple[int, float], ...]
    trend: str  # growing, shrinking, steady
    trend_ratio: float | None
    nonfinite_step: int | None
    hint: str
    heuristic: str = HEURISTIC

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["spikes"] = [list(s) for s in self.spikes]
        return data


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


# ---------------------------------------------------------------------------------------------
# Two adapters: do their updates live in the same subspace?


@dataclass(frozen=True)
class ModuleOverlap:
    module: str
    k: int
    overlap: float  # top-k column spaces, 1 = same
    random_baseline: float  # k / out: what two random k-dim subspaces would give
    other_in_this: float  # share of the other update's energy inside this one's column space
    this_in_other: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Comparison:
    other: str
    other_rank: float  # mean r of the other adapter's shared modules
    this_rank: float
    modules: tuple[ModuleOverlap, ...]
    only_here: int
    only_there: int

    @property
    def mean_overlap(self) -> float:
        return statistics.fmean(m.overlap for m in self.modules)

    @property
    def mean_random(self) -> float:
        return statistics.fmean(m.random_baseline for m in self.modules)

    @property
    def mean_other_in_this(self) -> float:
        return statistics.fmean(m.other_in_this for m in self.modules)

    @property
    def mean_this_in_other(self) -> float:
        return statistics.fmean(m.this_in_other for m in self.modules)

    @property
    def reading(self) -> str:
        """What the figures say about the larger rank: how much of its update the smaller one's subspace holds."""
        if self.other_rank == self.this_rank:
            return f"same rank; top directions overlap {self.mean_overlap:.2f} (random {self.mean_random:.2f})"
        larger, inside = ("other", self.mean_other_in_this) if self.other_rank > self.this_rank else ("this", self.mean_this_in_other)
        high = max(self.other_rank, self.this_rank)
        if inside >= 0.9:
            return f"{inside:.0%} of the rank-{high:g} ({larger}) update lies in the lower-rank one's subspace: the higher rank bought little"
        return f"{1 - inside:.0%} of the rank-{high:g} ({larger}) update lies outside the lower-rank one's subspace: the higher rank used directions the lower one lacks"

    def to_json(self) -> dict:
        return {
            "other": self.other, "other_rank": self.other_rank, "this_rank": self.this_rank,
            "mean_overlap": self.mean_overlap, "mean_random_baseline": self.mean_random,
            "mean_other_in_this": self.mean_other_in_this, "mean_this_in_other": self.mean_this_in_other,
            "reading": self.reading, "only_here": self.only_here, "only_there": self.only_there,
            "modules": [m.to_json() for m in self.modules],
        }


def compare(mine: dict[str, tuple[Spectrum, ModuleStats]], theirs: dict[str, tuple[Spectrum, ModuleStats]], other: str) -> Comparison:
    shared = [m for m in mine if m in theirs and mine[m][1].effective_rank and theirs[m][1].effective_rank]
    if not shared:
        raise LoraftError(f"--against: {other} adapts none of this adapter's modules (with a nonzero update); nothing to compare")
    rows = []
    for module in shared:
        (sa, ma), (sb, mb) = mine[module], theirs[module]
        if sa.left.shape[0] != sb.left.shape[0]:
            raise LoraftError(f"--against: {module} has output size {sa.left.shape[0]} here and {sb.left.shape[0]} in {other}; not the same model")
        k = min(ma.effective_rank, mb.effective_rank)
        rows.append(ModuleOverlap(module, k, subspace_overlap(sa.left, sb.left, k), k / sa.left.shape[0],
                                  energy_inside(sb, sa), energy_inside(sa, sb)))
    return Comparison(
        other=other,
        other_rank=statistics.fmean(theirs[m][1].rank for m in shared),
        this_rank=statistics.fmean(mine[m][1].rank for m in shared),
        modules=tuple(rows),
        only_here=len(set(mine) - set(theirs)),
        only_there=len(set(theirs) - set(mine)),
    )
