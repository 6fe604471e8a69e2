"""Speed choices, resolved once: fused LoRA projections, Liger kernels, how many layers to checkpoint, the
optimizer kernel, the CUDA allocator; and `SyncFreeSteps`, the Trainer mixin that keeps a training step from
waiting on the GPU.

None of these changes the training math (same losses to float tolerance; `tests/test_speed.py`
checks the optimised path against the plain PEFT+TRL one). Gradient checkpointing is
all-or-nothing in most tools; recomputing a layer costs ~1/3 of its step time, so with
`gradient_checkpointing: auto` we keep the activations of as many layers as the memory budget
allows and recompute only the rest.
"""

from __future__ import annotations

import importlib
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from lora_ft.config import RunConfig
from lora_ft.errors import ConfigError
from lora_ft.model.fused_lora import fuse_lora_layers, triton_available
from lora_ft.model.memory import (  # noqa: F401  (activation_gib_per_layer re-exported)
    QUANTIZED_UNFUSED_ACTIVATION_SCALE, activation_gib_per_layer, fewest_layers_to_checkpoint, logits_gib,
)

@dataclass(frozen=True)
class SpeedPlan:
    liger: bool
    checkpoint_layers: int  # decoder layers recomputed in backward (0 = none)
    total_layers: int
    optimizer: str
    fused_lora: bool = True
    lora_kernels: str = "torch"  # how the fused LoRA ops run dropout: "triton" or "torch"
    batching: str = "padded"  # SFT rows per step: "padding-free", "packed" (BFD, also padding-free) or "padded"
    # Liger's SwiGLU patch on a MoE replaces the experts' forward with a fused kernel that reads the expert weights
    # directly: under LoRA on the routed experts (PEFT's ParamWrapper) it fails, or would drop their update. Off then.
    liger_swiglu: bool = True

    def to_json(self) -> dict:
        return {
            "fused_lora": self.fused_lora,
            "lora_kernels": self.lora_kernels if self.fused_lora else None,
            "liger": self.liger,
            "liger_swiglu": self.liger and self.liger_swiglu,
            "checkpoint_layers": self.checkpoint_layers,
            "total_layers": self.total_layers,
            "optimizer": self.optimizer,
            "batching": self.batching,
        }

    def summary(self) -> str:
        gc = "off" if self.checkpoint_layers == 0 else f"{self.checkpoint_layers}/{self.total_layers} layers"
        fused = f"fused LoRA ({self.lora_kernels}), " if self.fused_lora else ""
        liger = "off" if not self.liger else "on" if self.liger_swiglu else "on (SwiGLU kept off: LoRA on the routed experts)"
        return (f"{fused}liger {liger}, checkpointing {gc}, optimizer {self.optimizer}, "
                f"{BATCHING[self.batching]}")


BATCHING = {
    "padding-free": "padding-free batches (rows back to back, no cross-row attention)",
    "packed": "packed rows (BFD into max_seq_length sequences, no cross-row attention)",
    "padded": "padded batches",
}


VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def batching(cfg: RunConfig) -> str:
    """How SFT rows fill a step. Padding-free is exact: TRL concatenates the batch's rows with position_ids
    restarting at each row, transformers' attention keeps rows apart (tests/test_speed.py), and each row's first
    label is dropped, a token padded batches never train either (no position predicts it); the per-token loss is
    the same. But TRL runs the whole batch as one sequence: flash attention takes it as variable-length rows, while
    under sdpa/eager transformers builds a block mask over all of it. On an H200 with sdpa, packed full-length rows
    (4 x 2048 as one 8,192-token sequence) trained at 8,988 tokens/s against 14,890 padded
    (scripts/results/bench_train_h200_issue25.json). So `auto` turns it on with flash attention only. Packing
    changes which rows share a step: a choice (data.packing), with the same attention caveat."""
    if cfg.training.method != "sft" or cfg.data is None:
        return "padded"  # the preference trainers collate their own pairs (no data: validate of a model-only config)
    if cfg.data.packing:
        return "packed"
    wanted = cfg.data.padding_free
    if wanted == "auto":
        wanted = cfg.model.attn_implementation in VARLEN_ATTENTION
    return "padding-free" if wanted else "padded"


def liger_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def check_speed_choices(cfg: RunConfig) -> None:
    """Speed settings this machine cannot honour, found before any weights load."""
    t = cfg.training
    if t.liger is True and not liger_available():
        raise ConfigError("training.liger: true needs CUDA and the liger-kernel package; pip install liger-kernel or set liger: auto")
    if t.fused_lora:
        _lora_kernels(t.lora_kernels, torch.cuda.is_available())


def plan_speed(cfg: RunConfig, model_config, *, weights_gib: float | None = None, trainable: int = 0, precision: str = "bf16",
               adapts_experts: bool = False) -> SpeedPlan:
    """`adapts_experts`: LoRA reaches a MoE's routed experts (coverage.Coverage.experts)."""
    t = cfg.training
    cuda = torch.cuda.is_available()
    check_speed_choices(cfg)
    liger = liger_available() if t.liger == "auto" else bool(t.liger)
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    if cuda:
        gpu_gib = t.memory_budget_gib or torch.cuda.get_device_properties(0).total_memory / 2**30
        check_fits(cfg, model_config, weights_gib if weights_gib is not None else torch.cuda.memory_allocated() / 2**30,
                   trainable, gpu_gib)
    if t.gradient_checkpointing is True:
        checkpoint = layers
    elif t.gradient_checkpointing is False or not cuda:
        checkpoint = 0
    else:
        logits = logits_gib(cfg, model_config, precision, liger=liger)
        checkpoint = _layers_to_checkpoint(cfg, model_config, layers, weights_gib, trainable, logits)
    optimizer = t.optimizer
    if optimizer == "auto":
        optimizer = "adamw_torch_fused" if cuda else "adamw_torch"
    return SpeedPlan(liger, checkpoint, layers, optimizer, fused_lora=t.fused_lora, lora_kernels=_lora_kernels(t.lora_kernels, cuda),
                     batching=batching(cfg), liger_swiglu=not adapts_experts)


def _lora_kernels(choice: str, cuda: bool) -> str:
    available = cuda and triton_available()
    if choice == "triton" and not available:
        raise ConfigError("training.lora_kernels: triton needs CUDA and the triton package; set lora_kernels: auto")
    return "triton" if choice != "torch" and available else "torch"


def check_fits(cfg: RunConfig, model_config, weights_gib: float, trainable: int, gpu_gib: float) -> None:
    """Refuse before the first step a batch x sequence that cannot train on this GPU however it is planned: even
    with every layer checkpointed it keeps the frozen weights, the trainable state (weight, gradient, Adam: 16
    bytes each), every layer's input (hidden x 2 bytes a token) and one layer's recomputed activations. The
    estimate is a floor (at 262k tokens an H200 run measured ~1.5x the one-layer figure), so this refuses only
    what cannot fit, never a run that would. With activation_offloading the layer inputs go to host memory,
    which is not modelled here: no refusal then."""
    t = cfg.training
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    if t.activation_offloading or layers == 0:
        return
    per_token = activation_gib_per_layer(model_config, 1, fused_lora=t.fused_lora)
    if cfg.model.quantization is not None and not t.fused_lora:
        per_token *= QUANTIZED_UNFUSED_ACTIVATION_SCALE
    per_token += layers * model_config.hidden_size * 2 / 2**30
    fixed = weights_gib + trainable * 16 / 2**30
    need = fixed + t.batch_size * t.max_seq_length * per_token
    if need <= gpu_gib:
        return

    longest = max(0, int((gpu_gib - fixed) / per_token / t.batch_size)) // 1024 * 1024
    raise ConfigError(
        f"training.max_seq_length {t.max_seq_length} at batch_size {t.batch_size} needs at least {need:.0f} GiB of GPU "
        f"memory even with every layer checkpointed ({fixed:.1f} GiB of weights and trainable state, "
        f"{per_token * 2**20:.0f} KiB a token); this GPU has {gpu_gib:.0f} GiB. The longest that fits: "
        f"max_seq_length {longest} at batch_size {t.batch_size} (or set training.activation_offloading: true)"
    )


def _layers_to_checkpoint(cfg: RunConfig, model_config, layers: int, weights_gib, trainable: int, logits_gib: float = 0.0) -> int:
    """Fewest checkpointed layers whose activations fit the budget (checkpoint the first ones), by the one
    memory model (model/memory.py) that validate and train print."""
    t = cfg.training
    budget = t.memory_budget_gib or 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    if weights_gib is None:
        weights_gib = torch.cuda.memory_allocated() / 2**30
    return fewest_layers_to_checkpoint(cfg, model_config, layers, budget=budget, weights=weights_gib, trainable=trainable,
                                       logits=logits_gib)


def apply_speed_plan(model, plan: SpeedPlan) -> None:
    """Fuse the LoRA projections (if planned) and set per-layer checkpointing on a PEFT-wrapped model."""
    if plan.fused_lora:
        fuse_lora_layers(model, triton=plan.lora_kernels == "triton")
    apply_checkpointing(model, plan.checkpoint_layers)


def apply_checkpointing(model, layers_to_checkpoint: int) -> None:
    """Checkpoint the first N decoder layers (non-reentrant); the rest keep their activations.

    Also turns the KV cache off for training: with a cache, transformers does not detect packed rows from
    position_ids, so packed (padding-free) rows would attend to each other (tests/test_speed.py shows it).
    """
    model.config.use_cache = False
    if layers_to_checkpoint <= 0:
        return

    # transformers 5.2x renamed it activation_checkpointing_enable (the old name warns); 5.17 has only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
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
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SyncFreeSteps:
    """Trainer mixin (listed before SFTTrainer): a training step never waits for the GPU.

    Stock, each step stops the host until the GPU has caught up several times: TRL's `compute_loss` reads the
    entropy, token accuracy and token count with `.item()` between forward and backward; the Trainer checks the
    loss for NaN (`logging_nan_inf_filter`) and counts input tokens with `.item()`; `NumericGuard` read the loss
    and the gradient norm. After each such sync the GPU idles while Python launches the next kernels. Here the
    same numbers stay on the device and are read once per logging step (and before a checkpoint or evaluation);
    the loss is TRL's own expression, and the guard's verdicts are the same (see `NumericGuard`).
    Needs `logging_nan_inf_filter=False` in the Trainer's arguments; this class applies the same filter on the
    device instead.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending_stats: list = []  # per step: [labelled tokens, entropy sum, top-1 hits] (TRL's metrics)
        self._pending_tokens = None  # input tokens since the last read (Trainer's num_input_tokens_seen)
        self._pending_trl_tokens = None  # the same for TRL's num_tokens metric

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        guard = getattr(self, "guard", None)
        if guard is not None:
            guard.after_backward(model, loss, step=self.state.global_step + 1, sync=self.accelerator.sync_gradients,
                                 optimizer=self.optimizer)
        if not self.args.logging_nan_inf_filter:
            # The Trainer's filter, on the device: a non-finite loss counts as the running mean of the window.
            window = 1 + self.state.global_step - self._globalstep_last_logged
            loss = torch.where(torch.isfinite(loss), loss, (self._tr_loss / window).to(loss.dtype))
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._plain_loss(model, return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        # TRL 1.16's SFTTrainer.compute_loss for its default case (fused LM head, nll loss), metrics kept on the device.
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (-outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        stats = [outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum()]
        self._pending_stats.append(torch.stack([s.float() for s in stats]))
        if "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        else:
            count = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        self._pending_trl_tokens = count if self._pending_trl_tokens is None else self._pending_trl_tokens + count
        return loss

    def _plain_loss(self, model, return_outputs) -> bool:
        """The case TRL computes as the fused head's mean log-likelihood, with entropy and accuracy as metrics."""
        parallel = getattr(self.accelerator, "parallelism_config", None)
        return (
            model.training and not return_outputs and self.compute_loss_func is None and self.label_smoother is None
            and self.args.loss_type == "nll" and not getattr(self, "aux_loss_enabled", False)
            and hasattr(self, "_total_train_tokens") and not (parallel is not None and getattr(parallel, "sp_enabled", False))
        )

    def _track_num_input_tokens(self, inputs):
        """The Trainer's count of input tokens, summed on the device (it read each step's with `.item()`)."""
        mode = self.args.include_num_input_tokens_seen
        name = getattr(self.model, "main_input_name", "input_ids")
        if mode == "no" or name not in inputs:
            return super()._track_num_input_tokens(inputs)
        pad = getattr(self.processing_class, "pad_token_id", None)
        if mode != "non_padding":
            count = inputs[name].numel()
        elif "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif pad is not None:
            count = (inputs[name] != pad).sum()
        else:
            count = inputs[name].numel()
        count = torch.as_tensor(count, device=self.args.device, dtype=torch.int64)
        self._pending_tokens = count if self._pending_tokens is None else self._pending_tokens + count

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        if self.control.should_log or self.control.should_save or self.control.should_evaluate:
            self.read_device_metrics()
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def log(self, logs, start_time=None):
        self.read_device_metrics()
        super().log(logs, start_time)

    def read_device_metrics(self) -> None:
        """Bring the device-side counters to the host (one sync each) and let the guard judge its steps."""
        guard = getattr(self, "guard", None)
        if guard is not None:
            guard.flush()
        if self._pending_tokens is not None:
            self.state.num_input_tokens_seen += int(self.accelerator.reduce(self._pending_tokens, reduction="sum").item())
            self._pending_tokens = None
        if self._pending_stats:
            stats = self.accelerator.reduce(torch.stack(self._pending_stats), reduction="sum")
            self._pending_stats = []
            valid = stats[:, 0]
            ratios = torch.where(valid[:, None] > 0, stats[:, 1:] / valid.clamp(min=1)[:, None], 0.0)
            for entropy, accuracy in ratios.tolist():
                self._metrics["train"]["entropy"].append(entropy)
                self._metrics["train"]["mean_token_accuracy"].append(accuracy)
        if self._pending_trl_tokens is not None:
            count = int(self.accelerator.reduce(self._pending_trl_tokens, reduction="sum").item())
            self._pending_trl_tokens = None
            self._total_train_tokens += count // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
