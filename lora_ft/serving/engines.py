"""What each serving engine does with a LoRA adapter, as read from its source: one typed rule per engine.

`serving.deployment` (checked before training) and `loraft export` (which writes and verifies what the
engine loads) both read these rules, so the check and the conversion cannot drift apart. Each rule
names the engine files it was read from (mid-2026 sources). The pitfall they guard: an engine that
loads an adapter without error and then serves it at the wrong scale (rsLoRA under SGLang or llama.cpp,
per-module alpha under vLLM), or refuses it at deployment time, after hours of training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from lora_ft.artifacts.adapter import UNSUPPORTED, AdapterConfig, lora_scale
from lora_ft.errors import ConfigError, LoraftError

Target = Literal["vllm", "sglang", "llamacpp", "ollama", "merged", "transformers"]
TARGETS: tuple[str, ...] = ("vllm", "sglang", "llamacpp", "ollama", "merged", "transformers")


@dataclass(frozen=True)
class EngineRule:
    """How one engine reads a LoRA adapter. `scaling` is the engine's own formula:
    'peft' (every PEFT option honoured), 'alpha/r' (global r from the config),
    'alpha/r|rslora' (alpha/sqrt(r) when use_rslora, else alpha/r; global r),
    'alpha/rank' (one alpha for the file, rank read from each lora_b tensor)."""

    name: str
    source: str  # the engine files this rule was read from
    layout: Literal["peft", "gguf", "merged"]
    scaling: Literal["peft", "alpha/r", "alpha/r|rslora", "alpha/rank"]
    reads_keys: tuple[str, ...] | None  # adapter_config.json keys the engine reads; None: all (PEFT)
    integer_alpha: bool  # lora_alpha must parse as an unsigned integer
    max_rank: int | None
    allowed_max_ranks: tuple[int, ...] = ()  # the values --max-lora-rank accepts
    tensor_suffixes: tuple[str, ...] = ()  # the only tensor names it accepts
    refuses: tuple[str, ...] = ()  # adapter features it cannot load (see FEATURES)
    string_target_modules: tuple[str, ...] | None = None  # accepted string values of target_modules

    @property
    def adapter(self) -> bool:
        return self.layout in ("peft", "gguf")

    def scale(self, alpha: float, r_config: int, r_module: int, use_rslora: bool) -> float:
        """The factor this engine multiplies B @ A by for one module: PEFT's rule (artifacts/adapter.py) with
        the rank and rsLoRA switch the engine actually reads."""
        if self.scaling == "alpha/rank":  # llama.cpp build_lora_mm: alpha 0 means scale 1
            return lora_scale(alpha, r_module, False) if alpha else 1.0
        return lora_scale(alpha, r_config, use_rslora and self.scaling != "alpha/r")


# What export cannot turn into something an adapter engine computes the same way. `loraft merge` folds
# each into the weights exactly (the fix named), trainable-token rows only once merge.py takes them;
# until then the fix named for those is PEFT itself.
FEATURES = {
    "dora": "DoRA (use_dora)",
    "bias": "trained biases (lora.bias other than none)",
    "modules_to_save": "fully trained modules (lora.modules_to_save)",
    "trainable_tokens": "trainable-token rows (lora.train_tokens / trainable_token_indices)",
    "embedding_lora": "LoRA on the embedding layer",
    "weight_init": "an init that rewrites the base weights (lora.init pissa/olora)",
}

_LLAMACPP = EngineRule(
    name="llamacpp",
    source="convert_lora_to_gguf.py, src/llama-adapter.cpp, src/llama-graph.cpp (build_lora_mm), gguf-py/gguf/tensor_mapping.py",
    layout="gguf",
    scaling="alpha/rank",
    reads_keys=("lora_alpha",),
    integer_alpha=False,
    max_rank=None,
    tensor_suffixes=(".lora_a", ".lora_b"),
    refuses=("dora", "bias", "modules_to_save", "trainable_tokens", "embedding_lora", "weight_init"),
)

RULES: dict[str, EngineRule] = {
    # vllm/lora/peft_helper.py (PEFTHelper: fields r, lora_alpha, target_modules, bias, modules_to_save,
    # use_rslora, use_dora, context_length; from_dict drops every other key; _validate_features refuses
    # modules_to_save and DoRA; validate_legal refuses bias != none without --enable-lora-bias and r above
    # max_lora_rank; __post_init__: alpha/sqrt(r) with use_rslora else alpha/r), vllm/lora/utils.py
    # (parse_fine_tuned_lora_name: names end in lora_A.weight / lora_B.weight / lora_embedding_A|B),
    # vllm/config/lora.py (MaxLoRARanks = 1, 8, 16, 32, 64, 128, 256, 320, 512; default 16).
    # Trainable-token deltas are not LoRA tensors and are refused.
    "vllm": EngineRule(
        name="vllm",
        source="vllm/lora/peft_helper.py, vllm/lora/utils.py, vllm/config/lora.py",
        layout="peft",
        scaling="alpha/r|rslora",
        reads_keys=("r", "lora_alpha", "target_modules", "bias", "modules_to_save", "use_rslora", "use_dora", "context_length"),
        integer_alpha=False,
        max_rank=512,
        allowed_max_ranks=(1, 8, 16, 32, 64, 128, 256, 320, 512),
        tensor_suffixes=("lora_A.weight", "lora_B.weight"),
        refuses=("dora", "bias", "modules_to_save", "trainable_tokens", "embedding_lora", "weight_init"),
    ),
    # python/sglang/srt/lora/lora.py (LoRAAdapter: scaling = config.lora_alpha / config.r, always: an
    # rsLoRA adapter is served sqrt(r) too weak, with no error), python/sglang/srt/lora/lora_config.py and
    # utils.py (refuse DoRA and adapters that add tokens; a string target_modules must be all / all-linear).
    "sglang": EngineRule(
        name="sglang",
        source="python/sglang/srt/lora/lora.py, python/sglang/srt/lora/lora_config.py, python/sglang/srt/lora/utils.py",
        layout="peft",
        scaling="alpha/r",
        reads_keys=("peft_type", "r", "lora_alpha", "target_modules"),
        integer_alpha=False,
        max_rank=None,
        tensor_suffixes=("lora_A.weight", "lora_B.weight"),
        refuses=("dora", "bias", "modules_to_save", "trainable_tokens", "embedding_lora", "weight_init"),
        string_target_modules=("all", "all-linear"),
    ),
    # convert_lora_to_gguf.py (reads only lora_alpha; exits on any tensor but lora_A/B; writes
    # general.type=adapter, adapter.type=lora, adapter.lora.alpha as float32; tensor names from gguf-py's
    # tensor map + ".lora_a"/".lora_b"; Q/K rows permuted through LoraTorchTensor.permute, which moves B only),
    # src/llama-adapter.cpp (general.architecture must equal the base's; a.ne[0] == W.ne[0], b.ne[1] ==
    # W.ne[1], a.ne[1] == b.ne[0]), src/llama-graph.cpp build_lora_mm (scale = alpha / b.ne[0], the rank
    # of each tensor; alpha 0 means scale 1).
    "llamacpp": _LLAMACPP,
    # convert/convert.go (AdapterParameters.Alpha is uint32 `json:"lora_alpha"`: "32.0" fails to parse;
    # KV() writes the same adapter.* keys llama.cpp reads), convert/convert_llama_adapter.go (its
    # safetensors importer knows llama and gemma2 only). Ollama also takes a GGUF adapter as is
    # (Modelfile ADAPTER), which is what export gives it; it runs llama.cpp's rule.
    "ollama": replace(
        _LLAMACPP,
        name="ollama",
        source="convert/convert.go, convert/convert_llama_adapter.go (+ llama.cpp's rule for the GGUF adapter)",
        integer_alpha=True,
    ),
    # lora_ft/merge.py: the adapter merged into the base weights, verified; every engine loads the result.
    "merged": EngineRule(
        name="merged", source="lora_ft/merge.py", layout="merged", scaling="peft", reads_keys=None,
        integer_alpha=False, max_rank=None, refuses=("trainable_tokens",),
    ),
    # peft/tuners/lora (PeftModel.from_pretrained): the run folder's own adapter, every option honoured.
    "transformers": EngineRule(
        name="transformers", source="peft (PeftModel.from_pretrained)", layout="peft", scaling="peft", reads_keys=None,
        integer_alpha=False, max_rank=None,
    ),
}


def rule_for(target: str) -> EngineRule:
    if target not in RULES:
        raise LoraftError(f"--to: {target!r} is not a target; choose one of {', '.join(TARGETS)}")
    return RULES[target]


# ---------------------------------------------------------------------------------------------
# An adapter's features, from the config (before training) or adapter_config.json (at export)


@dataclass(frozen=True)
class AdapterFeatures:
    rank: int
    alpha: float
    use_rslora: bool
    patterns: bool  # rank_pattern / alpha_pattern present
    features: frozenset[str]  # keys of FEATURES the adapter uses

    @classmethod
    def from_lora_spec(cls, lora) -> "AdapterFeatures":
        used = set()
        if lora.use_dora:
            used.add("dora")
        if lora.bias != "none":
            used.add("bias")
        if lora.modules_to_save:
            used.add("modules_to_save")
        if isinstance(getattr(lora, "train_tokens", None), list):  # the rows that train (preflight passes auto's choice)
            used.add("trainable_tokens")
        if lora.init in ("pissa", "olora"):
            used.add("weight_init")
        if isinstance(lora.target_modules, list) and "embed_tokens" in lora.target_modules:
            used.add("embedding_lora")
        return cls(lora.rank, lora.resolved_alpha, lora.use_rslora, False, frozenset(used))

    @classmethod
    def from_adapter_config(cls, cfg: AdapterConfig, tensor_names: list[str] = ()) -> "AdapterFeatures":
        raw = cfg.raw
        used = set()
        if cfg.use_dora:
            used.add("dora")
        if raw.get("bias", "none") != "none" or raw.get("lora_bias") or any(n.endswith("lora_B.bias") for n in tensor_names):
            used.add("bias")
        if raw.get("modules_to_save") or any(".modules_to_save." in n for n in tensor_names):
            used.add("modules_to_save")
        if cfg.trainable_token_indices or any("token_adapter" in n for n in tensor_names):
            used.add("trainable_tokens")
        if str(raw.get("init_lora_weights")).lower().startswith(("pissa", "olora", "corda", "eva", "loftq")):
            used.add("weight_init")
        if any("lora_embedding_" in n for n in tensor_names):
            used.add("embedding_lora")
        return cls(cfg.rank, cfg.alpha, cfg.use_rslora, cfg.has_patterns, frozenset(used))


@dataclass(frozen=True)
class Finding:
    target: str
    level: Literal["error", "note"]
    text: str


def check_target(rule: EngineRule, adapter: AdapterFeatures) -> list[Finding]:
    """Errors: what the engine refuses and export cannot convert (each names the fix).
    Notes: what export converts so that the engine's own rule computes the trained update."""
    found = []
    refused = set(rule.refuses) - ({"trainable_tokens"} if rule.name == "merged" and merge_takes_trainable_tokens() else set())
    for feature in sorted(adapter.features & refused):
        fix = "train without it, or deploy the merged model (serving.deployment: merged; loraft export --to merged)"
        if rule.name == "merged" or (feature == "trainable_tokens" and not merge_takes_trainable_tokens()):
            fix = "deploy the adapter with PEFT (serving.deployment: transformers; loraft export --to transformers)"
        found.append(Finding(rule.name, "error", f"{rule.name} cannot load {FEATURES[feature]}; {fix}"))
    if rule.max_rank is not None and adapter.rank > rule.max_rank:
        found.append(Finding(rule.name, "error", f"{rule.name} serves LoRA rank up to {rule.max_rank}; lora.rank is {adapter.rank}; lower it"))
    if not rule.adapter or rule.scaling == "peft":
        return found
    if adapter.use_rslora and not (rule.scaling == "alpha/r|rslora"):
        found.append(Finding(rule.name, "note", f"{rule.name} ignores use_rslora (scales {rule.scaling}); export folds alpha/sqrt(r) into the adapter"))
    if adapter.patterns:
        found.append(Finding(rule.name, "note", f"{rule.name} ignores rank_pattern/alpha_pattern; export folds each module's scale into its lora_B"))
    if rule.integer_alpha and not float(adapter.alpha).is_integer():
        found.append(Finding(rule.name, "note", f"{rule.name} reads lora_alpha as an unsigned integer; export folds alpha {adapter.alpha:g} into lora_B"))
    return found


def merge_takes_trainable_tokens() -> bool:
    """Whether `loraft merge` folds trainable-token rows into the embedding (then --to merged carries them)."""
    return "trainable_token_indices" not in UNSUPPORTED


def max_lora_rank(rule: EngineRule, rank: int) -> int | None:
    """The smallest value of the engine's --max-lora-rank that fits `rank`."""
    if not rule.allowed_max_ranks:
        return None
    return next(r for r in rule.allowed_max_ranks if r >= rank)


def go_uint32(text: str) -> int:
    """Parse a JSON number as Go's encoding/json does into a uint32 field (Ollama's lora_alpha):
    only an integer literal in range; '32.0' or '3.2e1' is an error."""
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) >= 2**32:
        raise ValueError(f"json: cannot unmarshal number {text} into Go struct field AdapterParameters.lora_alpha of type uint32")
    return int(text)


# ---------------------------------------------------------------------------------------------
# llama.cpp's names for a base architecture (convert_hf_to_gguf.py registers each HF architecture)

# HF model_type -> (gguf-py MODEL_ARCH name, whether convert_hf_to_gguf permutes Q/K rows for it).
# convert_hf_to_gguf.py: LlamaModel (llama, mistral) undoes HF's rotary layout with LlamaModel.permute on
# q_proj/k_proj; Qwen2Model and Gemma2Model keep the rows as they are.
GGUF_ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "gemma2": ("gemma2", False),
}


def gguf_arch(model_type: str) -> tuple[str, bool]:
    if model_type not in GGUF_ARCHS:
        raise LoraftError(
            f"llamacpp/ollama export knows the tensor names of {', '.join(sorted(GGUF_ARCHS))} models; this base is "
            f"{model_type!r}; deploy the merged model (serving.deployment: merged) and convert it with llama.cpp"
        )
    return GGUF_ARCHS[model_type]


def deployment_findings(serving, lora, model_type: str | None, base_is_gguf: bool) -> list[Finding]:
    """The pre-training check of serving.deployment: every chosen target's rule against the LoRA settings."""
    adapter = AdapterFeatures.from_lora_spec(lora)
    found: list[Finding] = []
    for target in serving.targets:
        rule = RULES[target]
        found += check_target(rule, adapter)
        if rule.layout == "gguf":
            if model_type is not None and model_type not in GGUF_ARCHS:
                found.append(Finding(target, "error", f"{target}: export writes GGUF adapters for {', '.join(sorted(GGUF_ARCHS))} "
                                     f"bases, not {model_type!r}; use serving.deployment: merged"))
            elif not base_is_gguf:
                found.append(Finding(target, "note", f"{target}: the base is not a GGUF file; convert it with llama.cpp's "
                                     "convert_hf_to_gguf.py (export names the adapter's tensors as that converter names the base's)"))
    return found


def check_deployment(serving, lora, model_type: str | None, base_is_gguf: bool) -> list[str]:
    """Raise ConfigError on the first refusal (one line, with the fix); return the notes."""
    found = deployment_findings(serving, lora, model_type, base_is_gguf)
    errors = [f for f in found if f.level == "error"]
    if errors:
        raise ConfigError(f"serving.deployment: {errors[0].text}")
    return [f"{f.target}: {f.text}" if not f.text.startswith(f.target) else f.text for f in found]
