"""The adapter on disk: the one reader of a PEFT LoRA folder, the one LoRA scale rule, the one "factors of a module".

Every command that reads an adapter (merge, export, inspect, eval, generate, chat, serve) reads it here:
`AdapterConfig.parse` turns adapter_config.json into a typed record (a missing or malformed key is one
LoraftError naming the file and the key), `lora_scale` is the scale PEFT applies (alpha/r, or alpha/sqrt(r)
with rsLoRA; per-module rank_pattern/alpha_pattern through `AdapterConfig.scale_for`), and `read_weights`
reads adapter_model.safetensors (never a pickle) into `ModuleFactors` (A, B and scale of one module), each
rank checked against the config, with the embedding rows trained beside it (`saved_token_rows`). A run folder
as a whole (manifest, config, base) is artifacts/adapter_run.py's. Pitfall guarded: two readers that disagree
on an adapter's scale, so that merge, inspect, export and serve describe or serve different updates for the
same folder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora_ft.artifacts.run_dir import file_sha256, read_json
from lora_ft.errors import LoraftError
from lora_ft.model.coverage import expert_factors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PEFT_PREFIX = "base_model.model."
# LoRA variants whose update is not W + s*B@A: loraft reads them nowhere (merge, export, serve).
UNSUPPORTED = {
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "aLoRA",
    "layer_replication": "layer replication",
    "use_bdlora": "BD-LoRA",
}
# PEFT's trainable_token_indices: the trained rows of an embedding, saved beside the LoRA factors.
TOKEN_DELTA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")
_TENSOR = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$")


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """The factor PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    """PEFT's rule (peft.utils.other.get_pattern_key): the pattern that names the module, or a tail of its path."""
    if module in patterns:
        return module
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


# ---------------------------------------------------------------------------------------------
# adapter_config.json


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_config.json, parsed and checked once. `raw` is the file as written (for derived copies)."""

    rank: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    target_modules: tuple[str, ...] | str | None
    target_parameters: tuple[str, ...]
    base_model: str | None
    trainable_token_indices: Any  # list of ids, or {module: ids}; None when no token rows trained
    fan_in_fan_out: bool
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def read(cls, folder: str | Path) -> "AdapterConfig":
        path = Path(folder) / ADAPTER_CONFIG
        return cls.parse(read_json(path), str(path))

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str = ADAPTER_CONFIG) -> "AdapterConfig":
        """Check every key a reader of the adapter depends on; one line naming the file and key on the first fault."""
        if not isinstance(raw, Mapping):
            raise LoraftError(f"{where}: not a JSON object; the adapter is damaged")
        kind = raw.get("peft_type", "LORA")
        if kind != "LORA":
            raise LoraftError(f"{where}: a {kind} adapter (peft_type); loraft reads LoRA adapters only")
        for key, what in UNSUPPORTED.items():
            if raw.get(key):
                raise LoraftError(f"{where}: {what} adapters ({key}) are not read by loraft; only plain LoRA (W + s*B@A)")
        rank = _positive_int(raw, "r", where)
        if "lora_alpha" not in raw:
            raise LoraftError(f"{where}: lora_alpha is missing, so the adapter's scale (lora_alpha / r) is unknown; "
                              "add the lora_alpha it was trained with")
        alpha = _number(raw["lora_alpha"], "lora_alpha", where)
        rank_pattern = _mapping(raw, "rank_pattern", where)
        alpha_pattern = _mapping(raw, "alpha_pattern", where)
        patterns = {k: _positive_int(rank_pattern, k, f"{where}: rank_pattern") for k in rank_pattern}
        alphas = {k: _number(v, f"alpha_pattern[{k!r}]", where) for k, v in alpha_pattern.items()}
        targets = raw.get("target_modules")
        if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
            targets = tuple(targets)
        elif not (targets is None or isinstance(targets, str)):
            raise LoraftError(f"{where}: target_modules is {targets!r}; expected a list of module names or a string")
        parameters = raw.get("target_parameters") or ()
        if not (isinstance(parameters, (list, tuple)) and all(isinstance(p, str) for p in parameters)):
            raise LoraftError(f"{where}: target_parameters is {parameters!r}; expected a list of parameter names")
        base = raw.get("base_model_name_or_path")
        if not (base is None or isinstance(base, str)):
            raise LoraftError(f"{where}: base_model_name_or_path is {base!r}; expected a model name or path")
        return cls(
            rank=rank, alpha=alpha, use_rslora=_flag(raw, "use_rslora", where), use_dora=_flag(raw, "use_dora", where),
            rank_pattern=patterns, alpha_pattern=alphas, target_modules=targets, target_parameters=tuple(parameters),
            base_model=base or None, trainable_token_indices=raw.get("trainable_token_indices") or None,
            fan_in_fan_out=_flag(raw, "fan_in_fan_out", where), raw=dict(raw),
        )

    def rank_for(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.rank

    def alpha_for(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scale_for(self, module: str) -> float:
        """The scale PEFT trains and serves `module` under (its own rank and alpha from the patterns)."""
        return lora_scale(self.alpha_for(module), self.rank_for(module), self.use_rslora)

    @property
    def scale(self) -> float:
        """The scale of a module no pattern names."""
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    @property
    def has_patterns(self) -> bool:
        return bool(self.rank_pattern or self.alpha_pattern)

    def summary(self) -> dict:
        """What reports show of it: r, lora_alpha and the switches, as configured."""
        return {"r": self.rank, "lora_alpha": self.alpha, "use_rslora": self.use_rslora, "use_dora": self.use_dora,
                "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern)}


def _positive_int(raw: Mapping, key: str, where: str) -> int:
    if key not in raw:
        raise LoraftError(f"{where}: {key} (the LoRA rank) is missing; the adapter is damaged")
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoraftError(f"{where}: {key} is {value!r}; expected a whole number of at least 1")
    return value


def _number(value, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraftError(f"{where}: {key} is {value!r}; expected a finite number")
    return float(value)


def _flag(raw: Mapping, key: str, where: str) -> bool:
    value = raw.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise LoraftError(f"{where}: {key} is {value!r}; expected true or false")
    return value


def _mapping(raw: Mapping, key: str, where: str) -> Mapping:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise LoraftError(f"{where}: {key} is {value!r}; expected an object of module name -> value")
    return value


# ---------------------------------------------------------------------------------------------
# The weights


@dataclass(frozen=True)
class ModuleFactors:
    """A, B and scale of one adapted module: its update is scale * B @ A, (out, in) in the base's layout
    (transposed for embeddings and Conv1D/fan_in_fan_out, whose weight is stored (in, out))."""

    module: str  # the module path in the base model, e.g. model.layers.0.self_attn.q_proj
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    alpha: float | None = None  # as configured for this module (None: read back from an engine's file)
    transpose: bool = False
    magnitude: torch.Tensor | None = None  # DoRA

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the update B @ A."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self) -> torch.Tensor:
        """The update in the base weight's layout, fp32."""
        d = self.B.float() @ self.A.float()
        return (d.T if self.transpose else d) * self.scale

    def with_b(self, B: torch.Tensor, scale: float) -> "ModuleFactors":
        return replace(self, B=B, scale=scale)


@dataclass(frozen=True)
class FusedFactors:
    """LoRA on an nn.Parameter (PEFT's ParamWrapper): a fused (experts, out, in) expert tensor or a 2-D router
    weight. A is (r*E, in), B is (out, r*E); expert e's update is scale * B_e @ A_e."""

    parameter: str  # the model's parameter name, e.g. model.layers.0.mlp.experts.gate_up_proj
    A: torch.Tensor
    B: torch.Tensor
    experts: int
    scale: float
    alpha: float
    out_first: bool

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_e, A_e): expert e's update is scale * B_e @ A_e, (out, in)."""
        return expert_factors(self.A, self.B, self.experts)[e]

    def per_expert(self) -> dict[str, ModuleFactors]:
        """One ModuleFactors per expert, named `<container>.<e>.<leaf>` (a router: the parameter's module)."""
        if self.experts == 1:
            module = self.parameter.removesuffix(".weight")
            return {module: ModuleFactors(module, self.A, self.B, self.scale, self.alpha)}
        container, _, leaf = self.parameter.rpartition(".")
        found = {}
        for e in range(self.experts):
            b_e, a_e = self.expert(e)
            module = f"{container}.{e}.{leaf}"
            found[module] = ModuleFactors(module, a_e, b_e, self.scale, self.alpha)
        return found


@dataclass(frozen=True)
class AdapterWeights:
    """adapter_model.safetensors grouped by what each tensor does to the base (keys: base tensor names)."""

    config: AdapterConfig
    path: Path  # the safetensors file
    factors: dict[str, ModuleFactors]  # <module>.weight -> its LoRA factors
    bias: dict[str, torch.Tensor]  # <module>.bias -> lora_B's bias, already scaled (lora_bias)
    replacements: dict[str, torch.Tensor]  # modules_to_save and trained biases: replace the base tensor
    fused: dict[str, FusedFactors] = field(default_factory=dict)  # LoRA on expert/router parameters
    token_rows: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)  # trained token rows

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def modules(self, *, embeddings: bool = True) -> dict[str, ModuleFactors]:
        """Every adapted module's factors by module path, fused experts split one per expert."""
        found = {f.module: f for f in self.factors.values() if embeddings or not f.transpose}
        for fused in self.fused.values():
            found.update(fused.per_expert())
        return found


def read_state(folder: str | Path, what: str = "--adapter") -> tuple[Path, dict[str, torch.Tensor]]:
    """The tensors of adapter_model.safetensors; a pickle is never read, a damaged file is one line naming it."""
    folder = Path(folder)
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = next((name for name in PICKLE_WEIGHTS if (folder / name).is_file()), None)
        if pickled:
            raise LoraftError(f"{what}: {folder / pickled} is a pickle, which loraft never reads (it can run code); "
                              f"re-save the adapter as {ADAPTER_WEIGHTS} (PEFT: save_pretrained(..., safe_serialization=True))")
        raise LoraftError(f"{what}: {folder} has no {ADAPTER_WEIGHTS}; the adapter's weights are missing")
    try:
        return path, load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraftError(f"{what}: {path} is damaged or truncated ({exc}); copy or train the adapter again") from None


def group_state(state: Mapping[str, torch.Tensor], config: AdapterConfig, wrappers: Mapping | None = None,
                where: str = ADAPTER_WEIGHTS) -> AdapterWeights:
    """PEFT's saved tensors -> factors per module (each rank checked against the config), biases, replacements,
    fused expert factors and trained token rows. `wrappers` (model/coverage.py) is the ParamWrapper layout of
    LoRA on expert/router parameters (target_parameters); it is needed only then."""
    if config.target_parameters and wrappers is None:
        raise LoraftError(f"{where}: LoRA on expert parameters (target_parameters) is read with the base model's config")
    token_rows = {f"{module}.weight": rows for module, rows in saved_token_rows(dict(state), dict(config.raw)).items()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if TOKEN_DELTA.match(key):
            continue
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = _TENSOR.match(name)
        if match:
            grouped.setdefault(match.group(1), {})[match.group(2)] = value
        elif ".base_layer." in name:  # PEFT saves a resized/trained embedding under its LoRA wrapper
            replacements[name.replace(".base_layer.", ".")] = value
        elif "lora_" in name or "token_adapter" in name:
            raise LoraftError(f"{where}: tensor {key} is of a LoRA variant loraft cannot read")
        else:  # modules_to_save and trained biases: the adapter's copy replaces the base tensor
            replacements[name] = value

    factors, bias, fused = {}, {}, {}
    for module, parts in sorted(grouped.items(), key=lambda item: _natural(item[0])):
        wrapper = (wrappers or {}).get(module)
        embedding = "lora_embedding_A" in parts
        A = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        B = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if A is None or B is None:
            raise LoraftError(f"{where}: {module} has lora_A without lora_B (or the reverse); the adapter file is damaged")
        if A.dim() != 2 or B.dim() != 2:
            raise LoraftError(f"{where}: {module} lacks a 2-D lora_A/lora_B pair (conv LoRA is not supported)")
        if wrapper is not None:
            name = wrapper.parameter
            rank, expected = A.shape[0] // wrapper.experts, config.rank_for(name)
        else:
            name = module
            rank, expected = A.shape[0], config.rank_for(module)
        if rank != expected or B.shape[1] != A.shape[0]:
            raise LoraftError(f"{where}: {module} has rank {rank} (lora_A {list(A.shape)}, lora_B {list(B.shape)}) but "
                              f"adapter_config.json says r = {expected}; the adapter is damaged or its config was edited")
        alpha = config.alpha_for(name)
        scale = lora_scale(alpha, rank, config.use_rslora)
        if wrapper is not None:
            if "lora_B.bias" in parts or "lora_magnitude_vector" in parts:
                raise LoraftError(f"{where}: {wrapper.parameter} has a LoRA bias or DoRA magnitude, which loraft cannot read")
            fused[wrapper.parameter] = FusedFactors(wrapper.parameter, A, B, wrapper.experts, scale, alpha, wrapper.out_first)
            continue
        transpose = embedding or config.fan_in_fan_out
        factors[f"{module}.weight"] = ModuleFactors(module, A, B, scale, alpha, transpose, parts.get("lora_magnitude_vector"))
        if "lora_B.bias" in parts:
            bias[f"{module}.bias"] = parts["lora_B.bias"].float() * scale
    return AdapterWeights(config, Path(where), factors, bias, replacements, fused, token_rows)


def read_weights(folder: str | Path, config: AdapterConfig, wrappers: Mapping | None = None, what: str = "--adapter") -> AdapterWeights:
    """The one reader of an adapter's weights: safetensors only, damage named, every rank checked against the config."""
    path, state = read_state(folder, what)
    weights = group_state(state, config, wrappers, str(path))
    if not weights.factors and not weights.fused and not weights.token_rows:
        raise LoraftError(f"{what}: {path} holds no LoRA weights; is it a LoRA adapter?")
    return weights


def saved_token_rows(state: dict, adapter_config: dict) -> dict[str, tuple[list[int], torch.Tensor]]:
    """module path -> (token ids, their trained rows) from an adapter's tensors and adapter_config.json."""
    indices = adapter_config.get("trainable_token_indices")
    if not indices:
        return {}
    found = {}
    for key, value in state.items():
        match = TOKEN_DELTA.match(key)
        if match is None:
            continue
        module = match["module"]
        ids = indices.get(module, indices.get(module.rsplit(".", 1)[-1])) if isinstance(indices, dict) else indices
        if ids is None or len(ids) != value.shape[0]:
            raise LoraftError(f"adapter: {key} holds {value.shape[0]} rows but adapter_config.json lists {ids}; the adapter is damaged")
        found[module] = (list(ids), value)
    return found


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
