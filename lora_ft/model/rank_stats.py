"""Per-module figures of a LoRA update and the rank verdict: what `train` records and `inspect` reports.

For each adapted module: ||ΔW|| and ||ΔW||/||W||, the singular values of ΔW = s·B·A (model/spectra.py, never
forming ΔW), its effective rank against r, and a verdict (saturated, balanced, largely unused, no update); then
the same figures grouped by layer and by module type. `adapter_statistics` is the plain-JSON form train puts in
manifest.json; rank_diagnostics.py (the inspect stage) reads a run folder into these and adds the gradient
history, notes and advice. Pitfall guarded: a verdict threshold that can never fire (see SATURATED_FRACTION).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from peft.utils.integrations import dequantize_module_weight

from lora_ft.artifacts.adapter import AdapterConfig, ModuleFactors, group_state, read_state
from lora_ft.errors import LoraftError
from lora_ft.model.coverage import parameter_wrappers
from lora_ft.model.spectra import DEFAULT_ENERGY, Spectrum, effective_rank, spectra_of

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
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer|decoder_layers)\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# Per module, and grouped by layer or module type


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


# ---------------------------------------------------------------------------------------------
# ||W|| of the frozen weights, from a model in memory (train)


def model_weight_norms(peft_model) -> dict[str, float]:
    """||W||_F of each LoRA-wrapped layer's frozen weight, from a model in memory (4-/8-bit dequantized);
    for fused expert parameters (PEFT's ParamWrapper) one norm per expert, named as FusedFactors.per_expert names them."""
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


# ---------------------------------------------------------------------------------------------
# Reading factors


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
# Verdicts


def rank_verdict(effective: int, rank: int) -> str:
    return NO_UPDATE if effective == 0 else share_verdict(effective / rank)


def share_verdict(share: float) -> str:
    """Verdict on the share of its rank an update uses (effective rank / r)."""
    if share >= SATURATED_FRACTION:
        return SATURATED
    if share <= UNUSED_FRACTION:
        return UNUSED
    return BALANCED
