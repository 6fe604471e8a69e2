"""One memory model of a LoRA run on its device: what `validate` and `train` print, and what the checkpointing
planner (model/speed.py, `gradient_checkpointing: auto`) budgets with, so the two cannot disagree.

device memory = frozen weights + LoRA state (fp32 weight, grad, two Adam moments: 16 bytes a parameter)
              + activations: every layer not recomputed keeps its full activations, a recomputed one only its
                input, and one layer's full activations live at a time during backward
              + logits (batch x sequence x vocab, their fp32 upcast and gradient; none with Liger's fused loss)
              + a planning margin (CUDA context, allocator slack).
Before this module, validate's estimate was 1.76x the planner's for Llama-3.1-8B and counted
`gradient_checkpointing: auto` as every layer recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_ft.config import RunConfig

GIB = 2**30
PLANNING_MARGIN_GIB = 3.0
QUANTIZED_UNFUSED_ACTIVATION_SCALE = 1.6


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


def activation_gib_per_layer(model_config, tokens: int, *, fused_lora: bool = True) -> float:
    hidden = model_config.hidden_size
    inter = getattr(model_config, "intermediate_size", 4 * hidden)
    return _layer_bytes_per_token(hidden, inter, fused_lora) * tokens / GIB


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    lora_state: float
    activations: float
    logits: float
    margin: float
    checkpoint_layers: int
    total_layers: int

    @property
    def total(self) -> float:
        return self.weights + self.lora_state + self.activations + self.logits + self.margin

    def summary(self) -> str:
        recomputed = f"{self.checkpoint_layers}/{self.total_layers} layers recomputed"
        return (f"memory      ~{self.total:.1f} GiB estimated on the device (weights {self.weights:.1f}, LoRA+optimizer "
                f"{self.lora_state:.2f}, activations {self.activations:.1f} with {recomputed}, logits {self.logits:.1f}, "
                f"margin {self.margin:.1f})")

    def to_json(self) -> dict:
        return {**self.__dict__, "total": self.total}


def weights_gib(cfg: RunConfig, total_params: int, precision: str) -> float:
    """Frozen weights on the device before they load: 4/8-bit blocks with their scales, else the load dtype."""
    q = cfg.model.quantization
    if q:
        per_param = 0.55 if q.bits == 4 else 1.05
    elif cfg.model.dtype != "auto":
        per_param = {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.model.dtype]
    else:
        per_param = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    return total_params * per_param / GIB


def logits_gib(cfg: RunConfig, model_config, precision: str, *, liger: bool) -> float:
    if liger:  # the fused linear cross-entropy never materialises the logits
        return 0.0
    t = cfg.training
    vocab = getattr(model_config, "vocab_size", 0) or 0
    return t.batch_size * t.max_seq_length * vocab * ((4 if precision == "fp32" else 2) + 4 + 4) / GIB


def _per_layer(cfg: RunConfig, model_config) -> tuple[float, float]:
    """(full activations of one layer, the input a recomputed layer keeps), GiB, for one batch."""
    t = cfg.training
    tokens = t.batch_size * t.max_seq_length
    per_layer = activation_gib_per_layer(model_config, tokens, fused_lora=t.fused_lora)
    if cfg.model.quantization is not None and not t.fused_lora:
        per_layer *= QUANTIZED_UNFUSED_ACTIVATION_SCALE
    return per_layer, tokens * model_config.hidden_size * 2 / GIB


def estimate_memory(cfg: RunConfig, model_config, *, weights: float, trainable: int, checkpoint_layers: int,
                    logits: float = 0.0, margin: float = PLANNING_MARGIN_GIB) -> MemoryEstimate:
    """`margin`: the CUDA context and allocator slack (none on a CPU)."""
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    per_layer, boundary = _per_layer(cfg, model_config)
    activations = per_layer + (layers - checkpoint_layers) * per_layer + checkpoint_layers * boundary
    return MemoryEstimate(weights, trainable * 16 / GIB, activations, logits, margin, checkpoint_layers, layers)


def fewest_layers_to_checkpoint(cfg: RunConfig, model_config, layers: int, *, budget: float, weights: float,
                                trainable: int, logits: float = 0.0) -> int:
    """Fewest recomputed layers (the first ones) whose estimate fits the budget; every layer when none fits."""
    per_layer, boundary = _per_layer(cfg, model_config)
    fixed = estimate_memory(cfg, model_config, weights=weights, trainable=trainable, checkpoint_layers=layers, logits=logits).total
    keep = max(0, min(layers, int((budget - fixed) // max(per_layer - boundary, 1e-9))))
    return layers - keep
