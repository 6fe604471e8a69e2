"""Speed choices, resolved once: fused LoRA projections, Liger kernels, how many layers to checkpoint, the
optimizer kernel, the CUDA allocator.

None of these changes the training math (same losses to float tolerance; `tests/test_speed.py`
checks the optimised path against the plain PEFT+TRL one). Gradient checkpointing is
all-or-nothing in most tools; recomputing a layer costs ~1/3 of its step time, so with
`gradient_checkpointing: auto` we keep the activations of as many layers as the memory budget
allows and recompute only the rest.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

from .config import RunConfig

# Activation bytes one decoder layer keeps per token when not checkpointed, bf16, LoRA with dropout on all 7
# projections of a Llama-style layer (6 projections read a hidden-wide input, down_proj an intermediate-wide one).
# The layer itself keeps ~2*(5*hidden + intermediate) bytes. PEFT's LoRA adds, per projection, its dropout mask
# and the dropped bf16 copy of the input: 3 bytes per input element (and under a 4-bit base, fp32 copies: ~1.6x
# the whole). The fused path keeps each distinct input once and no masks, about as much again as the layer, and
# the same under a 4-bit base. Calibrated on Llama-3.1-8B, 4x2048 tokens, H100 (scripts/results/bench_train.json):
# PEFT's path 47.9 GiB for 32 layers (~183 KB/token/layer; model: 186); fused ~35 GiB (~139; model: 139).
def _layer_bytes_per_token(hidden: int, inter: int, fused_lora: bool) -> int:
    layer = 2 * (5 * hidden + inter)
    lora = 2 * (5 * hidden + inter) if fused_lora else 3 * (6 * hidden + inter)
    return layer + lora


QUANTIZED_UNFUSED_ACTIVATION_SCALE = 1.6
PLANNING_MARGIN_GIB = 3.0


@dataclass(frozen=True)
class SpeedPlan:
    liger: bool
    checkpoint_layers: int  # decoder layers recomputed in backward (0 = none)
    total_layers: int
    optimizer: str
    fused_lora: bool = True
    lora_kernels: str = "torch"  # how the fused LoRA ops run dropout: "triton" or "torch"

    def to_json(self) -> dict:
        return {
            "fused_lora": self.fused_lora,
            "lora_kernels": self.lora_kernels if self.fused_lora else None,
            "liger": self.liger,
            "checkpoint_layers": self.checkpoint_layers,
            "total_layers": self.total_layers,
            "optimizer": self.optimizer,
        }

    def summary(self) -> str:
        gc = "off" if self.checkpoint_layers == 0 else f"{self.checkpoint_layers}/{self.total_layers} layers"
        fused = f"fused LoRA ({self.lora_kernels}), " if self.fused_lora else ""
        return f"{fused}liger {'on' if self.liger else 'off'}, checkpointing {gc}, optimizer {self.optimizer}"


def liger_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def check_speed_choices(cfg: RunConfig) -> None:
    """Speed settings this machine cannot honour, found before any weights load."""
    import torch

    t = cfg.training
    if t.liger is True and not liger_available():
        from .errors import ConfigError

        raise ConfigError("training.liger: true needs CUDA and the liger-kernel package; pip install liger-kernel or set liger: auto")
    if t.fused_lora:
        _lora_kernels(t.lora_kernels, torch.cuda.is_available())


def plan_speed(cfg: RunConfig, model_config, *, weights_gib: float | None = None, trainable: int = 0) -> SpeedPlan:
    import torch

    t = cfg.training
    cuda = torch.cuda.is_available()
    check_speed_choices(cfg)
    liger = liger_available() if t.liger == "auto" else bool(t.liger)
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    if t.gradient_checkpointing is True:
        checkpoint = layers
    elif t.gradient_checkpointing is False or not cuda:
        checkpoint = 0
    else:
        checkpoint = _layers_to_checkpoint(cfg, model_config, layers, weights_gib, trainable)
    optimizer = t.optimizer
    if optimizer == "auto":
        optimizer = "adamw_torch_fused" if cuda else "adamw_torch"
    return SpeedPlan(liger, checkpoint, layers, optimizer, fused_lora=t.fused_lora, lora_kernels=_lora_kernels(t.lora_kernels, cuda))


def _lora_kernels(choice: str, cuda: bool) -> str:
    from .fused_lora import triton_available

    available = cuda and triton_available()
    if choice == "triton" and not available:
        from .errors import ConfigError

        raise ConfigError("training.lora_kernels: triton needs CUDA and the triton package; set lora_kernels: auto")
    return "triton" if choice != "torch" and available else "torch"


def activation_gib_per_layer(model_config, tokens: int, *, fused_lora: bool = True) -> float:
    hidden = model_config.hidden_size
    inter = getattr(model_config, "intermediate_size", 4 * hidden)
    return _layer_bytes_per_token(hidden, inter, fused_lora) * tokens / 2**30


def _layers_to_checkpoint(cfg: RunConfig, model_config, layers: int, weights_gib, trainable: int) -> int:
    """Fewest checkpointed layers whose activations fit the budget (checkpoint the first ones)."""
    import torch

    t = cfg.training
    budget = t.memory_budget_gib or 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    tokens = t.batch_size * t.max_seq_length
    if weights_gib is None:
        weights_gib = torch.cuda.memory_allocated() / 2**30
    per_layer = activation_gib_per_layer(model_config, tokens, fused_lora=t.fused_lora)
    if cfg.model.quantization is not None and not t.fused_lora:
        per_layer *= QUANTIZED_UNFUSED_ACTIVATION_SCALE
    boundary = tokens * model_config.hidden_size * 2 / 2**30  # a checkpointed layer keeps only its input
    fixed = weights_gib + trainable * 16 / 2**30 + per_layer + layers * boundary + PLANNING_MARGIN_GIB
    free = budget - fixed
    keep = max(0, min(layers, math.floor(free / max(per_layer - boundary, 1e-9))))
    return layers - keep


def apply_speed_plan(model, plan: SpeedPlan) -> None:
    """Fuse the LoRA projections (if planned) and set per-layer checkpointing on a PEFT-wrapped model."""
    if plan.fused_lora:
        from .fused_lora import fuse_lora_layers

        fuse_lora_layers(model, triton=plan.lora_kernels == "triton")
    apply_checkpointing(model, plan.checkpoint_layers)


def configure_cuda_allocator() -> None:
    """Expandable segments: long and variable-length batches otherwise fragment the caching allocator until a
    run that fits on paper dies out of memory. Only before CUDA starts, and never over the user's own setting."""
    import os

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def apply_checkpointing(model, layers_to_checkpoint: int) -> None:
    """Checkpoint the first N decoder layers (non-reentrant); the rest keep their activations.

    Also turns the KV cache off for training: with a cache, transformers does not detect packed rows from
    position_ids, so packed (padding-free) rows would attend to each other (tests/test_speed.py shows it).
    """
    model.config.use_cache = False
    if layers_to_checkpoint <= 0:
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, block in enumerate(blocks):
        block.gradient_checkpointing = index < layers_to_checkpoint


@contextmanager
def liger_patches_scoped(model_config, active: bool):
    """Liger patches the architecture's modeling module globally (its RMSNorm class, rope function), not just
    our model; a model built later in the same process, e.g. on the CPU to verify a merge, would then run
    Triton kernels on CPU tensors. Restore the module's names when training is done."""
    if not active:
        yield
        return
    import importlib

    model_type = getattr(model_config, "model_type", "")
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        yield
        return
    saved = dict(vars(module))
    try:
        yield
    finally:
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


@contextmanager
def one_torch_thread():
    """Run many small CPU ops on one thread. Merge's shard pass and inspect's hundreds of r x r SVDs are bound
    by memory, not arithmetic; on a shared 2-core machine torch's OpenMP threads spun 20-50x slower than one
    (measured: merge shard pass 17.6 s -> 1.9 s; quickstart spectra 42 s -> 0.5 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
