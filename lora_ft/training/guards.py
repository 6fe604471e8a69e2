"""Guards around the training loop: signals that stop it cleanly, and numbers that must stay finite.

`StopSignals` turns SIGTERM and the first Ctrl-C into a flag; `SignalCallback` sees it at the next
step boundary, asks the Trainer to save and stop, and `train` then exits 143/130 with the command
that resumes. (The Trainer's own save-on-SIGTERM exits 0, so a scheduler would count an unfinished
run as done.) A second Ctrl-C exits at once; checkpoints are atomic, so nothing is left torn.

`NumericGuard` checks every optimizer step, not only logging steps: the Trainer's default
`logging_nan_inf_filter` hides a NaN loss by averaging it away, and a NaN gradient, once applied,
poisons the adapter and every checkpoint after it. A bad step is stopped on (or skipped, if the
config asks) before the optimizer sees it. Gradient-norm spikes are logged as warnings.
"""

from __future__ import annotations

import json
import math
import signal
import statistics
import threading
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from lora_ft.errors import EXIT_SIGINT, EXIT_SIGTERM, LoraftError

LIKELY_CAUSES = (
    "likely causes: learning rate too high (training.learning_rate), LoRA scale too large (lora.alpha / lora.rank), "
    "fp16 overflow (use precision: bf16 or fp32), a batch with every label masked, or non-finite base weights"
)


class NumericFault(LoraftError):
    """A non-finite loss or gradient; the last good checkpoint is intact."""


# ---------------------------------------------------------------------------------------------
# Signals


class StopSignals:
    """Context manager: SIGTERM / first SIGINT set `received`; a second one exits at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers only install there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            # Second signal: the user wants out now. Checkpoints are atomic, so leaving mid-save is safe.
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.received = signum

    @property
    def exit_code(self) -> int:
        return EXIT_SIGTERM if self.received == signal.SIGTERM else EXIT_SIGINT

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


class SignalCallback(TrainerCallback):
    """At the first step boundary after a signal: save a checkpoint and stop."""

    def __init__(self, signals: StopSignals):
        self.signals = signals

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed TrainerState keeps the interrupted run's intervals; the safe keys may have changed.
        state.compute_steps(args, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.signals.received is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
        return control


def _any_rank(flag: bool, device) -> bool:
    """True if `flag` is set on any process: every rank must stop (and save) at the same step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag

    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ---------------------------------------------------------------------------------------------
# Numeric faults


class SpikeDetector:
    """Flags a gradient norm above `factor` x the running median of the last `window` finite norms."""

    def __init__(self, factor: float = 10.0, window: int = 50, warmup: int = 5):
        self.factor = factor
        self.warmup = warmup
        self.history: deque[float] = deque(maxlen=window)

    def observe(self, norm: float) -> float | None:
        """Returns the median it was compared with if `norm` is a spike, else None."""
        median = statistics.median(self.history) if len(self.history) >= self.warmup else None
        self.history.append(norm)
        if median is not None and median > 0 and norm > self.factor * median:
            return median
        return None


class NumericGuard:
    """Called by the Trainer after every backward pass (see speed.SyncFreeSteps.training_step).

    With a fused torch AdamW (loraft's default on CUDA) nothing is read back inside a step: the loss and gradient
    norm are checked on the device, a bad step's update is cancelled there (the optimizer's `found_inf`, as AMP's
    grad scaler does: weights and moments untouched), and under `stop` every later update too, until `flush`
    (each logging step, and before a checkpoint or evaluation) reads the verdicts back, warns, records, and stops
    or counts skips, naming the bad step. With other optimizers each step is read back at once."""

    def __init__(self, policy: str, max_skipped: int, metrics_path: Path | None, console, resume_hint: str):
        self.policy = policy
        self.max_skipped = max_skipped
        self.metrics_path = Path(metrics_path) if metrics_path else None  # None on ranks other than 0
        self.console = console
        self.resume_hint = resume_hint
        self.spikes = SpikeDetector()
        self.skipped: list[int] = []
        self._bad_loss: float | None = None
        self._bad_loss_on_device = None  # the last non-finite micro-batch loss of this step (0 while none)
        self._halted = None  # 1 once a bad step was seen under `stop`: every later update is cancelled too
        self._pending: list[tuple[int, object]] = []  # (step, [bad loss or 0, gradient norm]) not yet judged

    def after_backward(self, model, loss, *, step: int, sync: bool, optimizer=None) -> None:
        """`step` is the optimizer step being computed (1-based); `sync` is true on its last micro-batch."""
        skipper = _device_skipping_optimizer(optimizer)
        if skipper is not None:
            return self._after_backward_on_device(model, loss, step, sync, skipper)
        value = float(loss.detach())
        if not math.isfinite(value):
            self._bad_loss = value
        if not sync:
            return
        norm = _grad_norm(model)
        bad_loss, self._bad_loss = self._bad_loss, None
        if self._judge(step, bad_loss, norm) == "skip":
            # No gradients -> the optimizer leaves every weight and its moments as they were.
            model.zero_grad(set_to_none=True)

    def _after_backward_on_device(self, model, loss, step: int, sync: bool, optimizer) -> None:
        loss = loss.detach().float()
        seen = self._bad_loss_on_device if self._bad_loss_on_device is not None else torch.zeros_like(loss)
        self._bad_loss_on_device = torch.where(torch.isfinite(loss), seen, loss)
        if not sync:
            return
        norm = _grad_norm_tensor(model).to(loss.device)
        bad = (~torch.isfinite(self._bad_loss_on_device) | ~torch.isfinite(norm)).float()
        if self.policy == "stop":
            bad = bad if self._halted is None else torch.maximum(bad, self._halted)
            self._halted = bad
        optimizer.found_inf = bad  # read by the fused kernel: the update is applied only where this is 0
        self._pending.append((step, torch.stack([self._bad_loss_on_device, norm])))
        self._bad_loss_on_device = None

    def flush(self) -> None:
        """Judge the steps checked on the device since the last flush, in order (one host sync)."""
        if not self._pending:
            return

        steps = [step for step, _ in self._pending]
        values = torch.stack([v for _, v in self._pending]).tolist()
        self._pending.clear()
        for step, (loss, norm) in zip(steps, values):
            self._judge(step, None if math.isfinite(loss) else loss, norm)

    def _judge(self, step: int, bad_loss: float | None, norm: float) -> str:
        """"ok" or "skip" for one optimizer step, or raise NumericFault; warns on spikes, records events."""
        if bad_loss is None and math.isfinite(norm):
            median = self.spikes.observe(norm)
            if median is not None:
                self.console.print(f"[yellow]warning:[/] step {step}: gradient norm {norm:.3g} is {norm / median:.0f}x the running median {median:.3g}")
                self._record({"step": step, "event": "grad_norm_spike", "grad_norm": norm, "median_grad_norm": median})
            return "ok"
        what = f"loss is {bad_loss}" if bad_loss is not None else f"gradient norm is {norm}"
        if self.policy == "stop":
            raise NumericFault(f"step {step}: {what}; stopped before applying it ({LIKELY_CAUSES}). {self.resume_hint}")
        self.skipped.append(step)
        self._record({"step": step, "event": "skipped_step", "reason": what})
        self.console.print(f"[yellow]warning:[/] step {step}: {what}; step skipped ({len(self.skipped)} of at most {self.max_skipped})")
        if len(self.skipped) > self.max_skipped:
            raise NumericFault(
                f"step {step}: {len(self.skipped)} steps skipped for non-finite loss or gradients "
                f"(training.max_skipped_steps: {self.max_skipped}); {LIKELY_CAUSES}. {self.resume_hint}"
            )
        return "skip"

    def _record(self, record: dict) -> None:
        if self.metrics_path is None:
            return
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _device_skipping_optimizer(optimizer):
    """The torch optimizer under accelerate's wrapper if it can cancel an update on the device (fused Adam/AdamW
    honour `found_inf`), else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is None or not getattr(inner, "_step_supports_amp_scaling", False):
        return None
    return inner if inner.defaults.get("fused") else None


def _grad_norm_tensor(model):
    grads = [p.grad.detach() for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return torch.zeros(())
    # One fused kernel group over every LoRA gradient (hundreds of tensors), no host sync.
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def _grad_norm(model) -> float:
    return float(_grad_norm_tensor(model))
