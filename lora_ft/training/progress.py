"""Training progress: per-step metrics to `metrics.jsonl`, a live line in the terminal, the loss curve.

The Trainer's tqdm bar is off; this callback prints loss, learning rate, tokens/s and ETA at each
logging step, and appends every log record as one JSON line (a torn last line after a crash is
skipped on read). tokens/s is the recent window's rate (since the previous log line, evaluation and
checkpoint time left out), so it shows the steady speed rather than a mean dragged down by the first,
slow steps; `tokens_per_s_mean` in the record is the mean since the start. On CUDA the line and the record also
carry the peak GPU memory so far (`peak_gpu_gib`, torch's allocator peak, as in the manifest).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from lora_ft.training.preference import progress_parts


class MetricsCallback(TrainerCallback):
    def __init__(self, path: Path, console):
        self.path = Path(path)
        self.console = console
        self.started = None
        self.start_step = 0
        self.start_tokens = 0
        self.window = None  # (time, tokens seen) where the current rate window starts

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()
        if not state.is_world_process_zero:
            self.console = None  # only rank 0 prints and writes metrics
        self.start_step = state.global_step
        self.start_tokens = state.num_input_tokens_seen or 0
        self.window = (self.started, self.start_tokens)
        if self.console is not None:
            self.console.print(f"training: {state.max_steps} steps")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **_plain(logs)}
        now, seen = time.time(), state.num_input_tokens_seen or 0
        elapsed = now - (self.started or now)
        window_start, window_tokens = self.window or (now, seen)
        if now > window_start and seen > window_tokens:
            record["tokens_per_s"] = round((seen - window_tokens) / (now - window_start), 1)
        if elapsed > 0 and seen > self.start_tokens:
            record["tokens_per_s_mean"] = round((seen - self.start_tokens) / elapsed, 1)
        record["elapsed_s"] = round(elapsed, 3)
        peak = peak_gpu_gib()
        if peak is not None:
            record["peak_gpu_gib"] = peak
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self._print(record, state, elapsed)
        self.window = (time.time(), seen)  # the next window starts after this log (and any evaluation before it)

    def on_save(self, args, state, control, **kwargs):
        self.window = (time.time(), state.num_input_tokens_seen or 0)  # checkpoint time is not training speed

    def _print(self, record: dict, state, elapsed: float) -> None:
        step, total = state.global_step, state.max_steps or 0
        done = step - self.start_step
        eta = elapsed / done * (total - step) if done > 0 else 0.0
        parts = [f"step {step}/{total}"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if "eval_loss" in record:
            parts.append(f"eval_loss {record['eval_loss']:.4f}")
        if "grad_norm" in record:
            parts.append(f"grad_norm {record['grad_norm']:.3f}")
        parts += progress_parts(record)  # preference runs: margin, accuracy, chosen/rejected log p
        if "learning_rate" in record:
            parts.append(f"lr {record['learning_rate']:.2e}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        if "peak_gpu_gib" in record:
            parts.append(f"peak GPU {record['peak_gpu_gib']:.1f} GiB")
        if "loss" in record and step < total:
            parts.append(f"eta {_duration(eta)}")
        if len(parts) > 1:
            self.console.print("  ".join(parts))


def peak_gpu_gib() -> float | None:
    """Peak GPU memory allocated by torch in this process so far (GiB), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _plain(logs: dict) -> dict:
    out = {}
    for key, value in logs.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
    return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    return records


def plot_loss_curve(history: list[dict], out: Path) -> bool:
    """Write the train/eval loss curve as PNG; returns False (no file) where matplotlib is not installed."""
    try:
        import matplotlib  # lazy: matplotlib.use must run before pyplot loads; and a missing matplotlib means no curve
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), label="eval", color="tab:orange", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True
