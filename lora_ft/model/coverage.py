"""What the LoRA targets reach, by block type, and how routed experts are targeted on MoE models.

In transformers 5 the routed experts of an MoE layer are fused 3-D parameters (`experts.gate_up_proj`,
`experts.down_proj`: one slice per expert), not `nn.Linear` layers, and the router is a custom module.
PEFT reaches them only through `target_parameters` (its `ParamWrapper`), and its `all-linear` reaches
them for some families only, through a transformers-4 compatibility rewrite that also adapts the router
(Qwen3-MoE, Mixtral, OLMoE: experts and router trained) and not at all for others (Qwen2-MoE: experts
silently frozen). loraft decides itself (`lora.target_experts`, `lora.target_router`), hands PEFT explicit
names, and reports what the wrapped model really adapts, block by block, so neither "experts silently
frozen" nor "experts silently trained" can pass unseen.

`target_plan` turns the config into PEFT's target_modules/target_parameters; `check_expert_options`
names the options PEFT cannot combine with expert parameters (a config error, before weights load);
`coverage` measures a wrapped model; `parameter_wrappers` says which saved LoRA key adapts which
parameter, with its expert count and layout (merge and inspect need it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lora_ft.config import ATTENTION_MODULES, MLP_MODULES, LoraSpec
from lora_ft.errors import ConfigError, ModelError, VerificationError
from lora_ft.model.shapes import meta_model, resolve_target_modules

ATTENTION, DENSE_MLP, ROUTED, SHARED, ROUTER, EMBEDDINGS, OTHER = (
    "attention", "dense MLP", "routed experts", "shared experts", "router", "embeddings", "other",
)
BLOCKS = (ATTENTION, DENSE_MLP, ROUTED, SHARED, ROUTER, EMBEDDINGS, OTHER)
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------
# Block types, from module paths and class names (no family table to keep up to date)


def _parts(name: str) -> list[str]:
    return name.split(".")


def is_router(module_name: str, module, parent) -> bool:
    """The gate that picks experts: a *Router module (transformers 5), a `gate`/`router` beside an
    `experts` child (older layouts), or a shared expert's scalar gate (`shared_expert_gate`)."""
    leaf = module_name.rsplit(".", 1)[-1]
    if "router" in type(module).__name__.lower() or leaf.endswith("expert_gate"):
        return True
    return leaf in ("gate", "router") and parent is not None and hasattr(parent, "experts")


def block_types(model) -> dict[str, str]:
    """Block type of every parameter of a (meta or real, unwrapped) model, by parameter name."""
    modules = dict(model.named_modules())
    embeddings = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    routers = {
        name for name, module in modules.items()
        if name and is_router(name, module, modules.get(name.rpartition(".")[0]))
    }
    types = {}
    for name, module in modules.items():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{name}.{param_name}" if name else param_name
            types[full] = _block_of(name, id(module) in embeddings, routers)
    return types


def _block_of(module_name: str, is_embedding: bool, routers: set[str]) -> str:
    if is_embedding:
        return EMBEDDINGS
    parts = _parts(module_name)
    if any(".".join(parts[: i + 1]) in routers for i in range(len(parts))):
        return ROUTER
    if any(p.startswith("shared_expert") for p in parts):
        return SHARED
    if "experts" in parts:
        return ROUTED
    if any("attn" in p or "attention" in p for p in parts):
        return ATTENTION
    if any(p in ("mlp", "feed_forward", "ffn", "block_sparse_moe") for p in parts):
        return DENSE_MLP
    return OTHER


# ---------------------------------------------------------------------------------------------
# Targets: what PEFT is asked to adapt


@dataclass(frozen=True)
class TargetPlan:
    modules: list[str] | str  # PEFT target_modules (leaf names, or "all-linear" on a dense model)
    parameters: list[str]  # PEFT target_parameters (fused experts, router weights)
    moe: bool
    experts: bool  # routed experts adapted
    router: bool


def expert_parameter_names(model) -> list[str]:
    """Leaf names of the fused 3-D routed-expert parameters (e.g. gate_up_proj, down_proj)."""
    types = block_types(model)
    return sorted({name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.dim() == 3 and types.get(name) == ROUTED})


def router_targets(model) -> tuple[list[str], list[str]]:
    """(router leaf names that are nn.Linear, router weights as PEFT target_parameters "leaf.param")."""
    modules = dict(model.named_modules())
    linear, params = set(), set()
    for name, module in modules.items():
        if not name or not is_router(name, module, modules.get(name.rpartition(".")[0])):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear):
            linear.add(leaf)
        elif isinstance(getattr(module, "weight", None), torch.nn.Parameter) and module.weight.dim() == 2:
            params.add(f"{leaf}.weight")
    return sorted(linear), sorted(params)


def target_plan(lora: LoraSpec, model, linear: list[str]) -> TargetPlan:
    """PEFT's targets for this model. Dense models: as before (all-linear goes to PEFT as is). MoE models:
    explicit leaf names, so PEFT's transformers-4 rewrite of all-linear (which adapts the router, and only
    for some families the experts) never decides; the experts by `target_experts`, the router by `target_router`."""
    experts = expert_parameter_names(model)
    router_linear, router_params = router_targets(model)
    if not experts and not router_linear and not router_params:
        return TargetPlan(resolve_target_modules(lora, linear), [], False, False, False)
    want_experts = bool(experts) and (
        lora.target_experts is True or (lora.target_experts == "auto" and lora.target_modules in ("all-linear", "mlp"))
    )
    dense = [name for name in linear if name not in router_linear]
    if lora.target_modules == "all-linear":
        modules = dense
    elif lora.target_modules in ("attention", "mlp"):
        wanted = ATTENTION_MODULES if lora.target_modules == "attention" else MLP_MODULES
        modules = [name for name in wanted if name in dense]
        if not modules and not want_experts:
            raise ModelError(
                f"lora.target_modules: preset {lora.target_modules!r} matches no layer of this model; "
                f"its linear layers are: {', '.join(linear)}" + ("; its routed experts: lora.target_experts: true" if experts else "")
            )
    else:
        modules = resolve_target_modules(lora, linear)
        if lora.target_router:
            modules = [name for name in modules if name not in router_linear]
    parameters = list(experts) if want_experts else []
    if lora.target_router:
        modules = sorted(set(modules) | set(router_linear))
        parameters += router_params
    if not modules and not parameters:
        raise ModelError("lora: the targets reach no weight of this model; add target_modules or lora.target_experts: true")
    return TargetPlan(list(modules), parameters, True, want_experts, bool(lora.target_router))


def check_expert_options(lora: LoraSpec, plan: TargetPlan) -> None:
    """Options PEFT's ParamWrapper (LoRA on expert/router parameters) cannot do: a config error naming the fix."""
    if not plan.parameters:
        return
    what = "routed experts" if plan.experts else "router"
    off = "lora.target_experts: false to leave the experts frozen" if plan.experts else "lora.target_router: false"
    if lora.dropout:
        raise ConfigError(
            f"lora.dropout: {lora.dropout:g} cannot apply to the {what} of this MoE model (PEFT adapts fused expert "
            f"weights without dropout); set lora.dropout: 0, or {off}"
        )
    if lora.use_dora:
        raise ConfigError(f"lora.use_dora: DoRA cannot apply to the {what} of this MoE model; set use_dora: false, or {off}")
    if lora.init in ("pissa", "olora"):
        raise ConfigError(
            f"lora.init: {lora.init} needs a 2-D weight to decompose and the {what} of this MoE model are fused 3-D "
            f"parameters; use init: default, or {off}"
        )


def check_plan_applied(plan: TargetPlan, peft_config, model_type: str) -> None:
    """PEFT rewrites some target names on MoE families it converts from transformers 4 (gate_proj, up_proj,
    down_proj, w1..w3, gate). If it changed ours, what trains is not what the config says: stop."""
    if not plan.moe:
        return
    got_modules = set(peft_config.target_modules or ())
    got_params = set(peft_config.target_parameters or ())
    if got_modules != set(plan.modules) or got_params != set(plan.parameters):
        moved = ", ".join(sorted(set(plan.modules) - got_modules)) or "?"
        raise ModelError(
            f"lora.target_modules: PEFT turns the linear layers named {moved} of this {model_type} model into its routed "
            f"experts' parameters (a transformers-4 compatibility rename), so those dense or shared-expert layers cannot "
            f"be adapted and would silently stay frozen; list target_modules without {moved} to train the rest"
        )


# ---------------------------------------------------------------------------------------------
# Coverage of a wrapped model


@dataclass(frozen=True)
class BlockCoverage:
    block: str
    weights: int  # parameters in this block's weight matrices (2-D and 3-D)
    reached: int  # of those, in matrices the adapter changes (LoRA or trained in full)
    trainable: int  # trainable parameters attributed to this block (LoRA factors, full copies)

    @property
    def share(self) -> float:
        return self.reached / self.weights if self.weights else 0.0

    def to_json(self) -> dict:
        return {"block": self.block, "weights": self.weights, "reached": self.reached,
                "share": round(self.share, 6), "trainable": self.trainable}


@dataclass(frozen=True)
class Coverage:
    blocks: tuple[BlockCoverage, ...]
    moe: bool
    experts: bool
    router: bool
    expert_parameters: tuple[str, ...]
    adapted: frozenset = frozenset()  # the base parameters the adapter changes, by name

    def block(self, name: str) -> BlockCoverage | None:
        return next((b for b in self.blocks if b.block == name), None)

    def summary(self) -> str:
        cells = [f"{b.block} {100 * b.share:.0f}%" for b in self.blocks if b.weights and b.block != OTHER]
        line = "reaches     " + " · ".join(cells) + "  (share of each block's weights)"
        if not self.moe:
            return line
        routed = self.block(ROUTED)
        if self.experts:
            state = f"routed experts ADAPTED ({', '.join(self.expert_parameters)}; lora.target_experts)"
        elif routed and routed.weights:
            state = "routed experts FROZEN (lora.target_experts: false, or a list/attention target without it)"
        else:
            state = "no fused routed experts found"
        router = "router ADAPTED (lora.target_router: true)" if self.router else "router frozen (lora.target_router)"
        return f"{line}\nmoe         {state}; {router}"

    def to_json(self) -> dict:
        return {"moe": self.moe, "routed_experts_adapted": self.experts, "router_adapted": self.router,
                "expert_parameters": list(self.expert_parameters), "blocks": [b.to_json() for b in self.blocks]}


def coverage(peft_model, plan: TargetPlan | None = None) -> Coverage:
    """Per block type: weight-matrix parameters, those the adapter changes, and trainable parameters, measured
    on the wrapped model itself (what PEFT did, not what was asked)."""
    from peft.tuners.lora import LoraLayer  # lazy: peft ~3 s + bitsandbytes notes on stderr; merge/export/generate import this module, never wrap

    base = peft_model.get_base_model()
    reached = set()
    wrapped = parameter_wrappers(peft_model)
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and type(module).__name__ != "ParamWrapper":
            reached.add(f"{_unwrapped(name)}.weight")
        elif type(module).__name__ == "ModulesToSaveWrapper":
            reached.update(f"{_unwrapped(name)}.{p}" for p, _ in module.original_module.named_parameters())
    reached.update(w.parameter for w in wrapped.values())
    owners = _module_blocks(base)
    weights, hit, trainable = dict.fromkeys(BLOCKS, 0), dict.fromkeys(BLOCKS, 0), dict.fromkeys(BLOCKS, 0)
    for name, param in base.named_parameters():
        original = _unwrapped(name)
        block = owners.get(_owner(original), OTHER)
        if param.requires_grad:
            trainable[block] += param.numel()
        if ".lora_" in original or ".modules_to_save." in original or param.dim() < 2:
            continue
        weights[block] += param.numel()
        if original in reached:
            hit[block] += param.numel()
    blocks = tuple(BlockCoverage(b, weights[b], hit[b], trainable[b]) for b in BLOCKS if weights[b] or trainable[b])
    experts = sorted({w.parameter.rsplit(".", 1)[-1] for w in wrapped.values() if w.experts > 1})
    moe = plan.moe if plan is not None else bool(experts)
    return Coverage(blocks, moe, bool(experts), any(w.experts == 1 for w in wrapped.values()), tuple(experts),
                    frozenset(reached))


def check_same_coverage(peft_model, planned: Coverage) -> None:
    """The model with its weights must be wrapped exactly as the meta model validate reported."""
    actual = coverage(peft_model, None)  # by name: a 4-bit weight is packed, so its parameter count differs
    if actual.adapted != planned.adapted:
        raise VerificationError(
            f"lora: the loaded model's adapter reaches {actual.summary()} but validate reported {planned.summary()}"
        )


def _unwrapped(name: str) -> str:
    """PEFT-wrapped name -> the base model's own name (no .base_layer, .original_module)."""
    for marker in (".base_layer", ".original_module"):
        name = name.replace(marker, "")
    return name


def _owner(original: str) -> str:
    """The module a parameter belongs to; LoRA factors and trained copies belong to the module they adapt."""
    for marker in (".lora_", ".modules_to_save.", ".token_adapter."):
        if marker in original:
            return original.split(marker, 1)[0]
    return original.rpartition(".")[0]


def _module_blocks(base) -> dict[str, str]:
    """Block type per (unwrapped) module path of a PEFT-wrapped base."""
    modules = {_unwrapped(n): m for n, m in base.named_modules()}
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        found = getattr(base, getter)()
        if found is not None:
            embeddings.update(n for n, m in modules.items() if m is found or getattr(m, "base_layer", None) is found)
    routers = {n for n, m in modules.items() if n and is_router(n, _innermost(m), modules.get(n.rpartition(".")[0]))}
    return {n: _block_of(n, n in embeddings, routers) for n in modules}


def _innermost(module):
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


# ---------------------------------------------------------------------------------------------
# Which saved key adapts which parameter (PEFT nests one ParamWrapper per parameter of a module)


@dataclass(frozen=True)
class WrappedParameter:
    key: str  # saved key prefix, e.g. model.layers.0.mlp.experts.base_layer
    parameter: str  # the base model's parameter, e.g. model.layers.0.mlp.experts.down_proj
    experts: int  # 1 for a 2-D parameter (router)
    out_first: bool  # 3-D layout (experts, out, in); False: (experts, in, out)
    shape: tuple[int, ...]


def parameter_wrappers(peft_model) -> dict[str, WrappedParameter]:
    """Every ParamWrapper of a PEFT model (meta or real), by the key prefix its factors are saved under."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    found = {}
    for name, module in base.named_modules():
        if type(module).__name__ != "ParamWrapper":
            continue
        param = module.get_param()
        shape = tuple(getattr(param, "ds_shape", param.shape))
        found[name] = WrappedParameter(
            name, f"{_unwrapped(name)}.{module.parameter_name}", int(module.num_experts),
            bool(module._did_swap_in_out_features), shape,
        )
    return found


def wrappers_for_adapter(model_config, adapter_config: dict, trust_remote_code: bool = False) -> dict[str, WrappedParameter]:
    """The ParamWrapper layout of a saved adapter, rebuilt on the base's meta model (no weights)."""
    from peft import LoraConfig, get_peft_model  # lazy: peft ~3 s + bitsandbytes notes on stderr; merge/export/generate import this module, never wrap

    if not adapter_config.get("target_parameters"):
        return {}
    keys = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in adapter_config.items() if k in keys and k not in ("peft_type", "auto_mapping")})
    config.init_lora_weights = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(meta_model(model_config, trust_remote_code), config)
    return parameter_wrappers(peft_model)


def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's ParamWrapper factors -> one (B_e, A_e) pair per expert, delta_e = s * B_e @ A_e (out x in).
    lora_A is (r*E, in) grouped by expert; lora_B is (out, r*E) with the expert index fastest
    (peft ParamWrapper.get_delta_weight: B.reshape(out, r, E), A.reshape(E, r, in))."""
    a = lora_a.reshape(experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, experts)
    return [(b[:, :, e], a[e]) for e in range(experts)]
