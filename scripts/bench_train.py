"""Training speed and memory: loraft's path against the anchor (plain PEFT + TRL SFTTrainer) in one GPU run.

Identical work for both: a Llama-3.1-8B-shaped model (random weights, one checkpoint on disk shared by
both, so losses are comparable), LoRA r=16 alpha=32 dropout 0.05 on the 7 projections, AdamW, lr 2e-4
cosine, batch x seq tokens per step; rows are a random 64-token motif repeated, so the loss falls and
the curves can be compared step by step ("speed must not change the math").

  python scripts/bench_train.py all --steps 20 --out scripts/results/bench_train.json   (driver: every case below)
  python scripts/bench_train.py one anchor lora 4 2048 20            (one case, one JSON line)
  python scripts/bench_train.py one loraft lora 4 2048 20 --gc auto  (loraft with its automatic plan)
  python scripts/bench_train.py probe --mode qlora                   (longest batch-1 sequence, anchor vs loraft)
  python scripts/bench_train.py cli llama8b --steps 30               (`loraft train configs/llama8b.yaml` itself)

The anchor case follows ../shared/bench/seed_recipe_baseline.py exactly (bf16 autocast, gradient
checkpointing, TRL defaults), except that its weights load from the shared checkpoint. LoRA-MFU counts
useful FLOPs only: frozen linears forward 2N + input-gradient 2N, lm_head 4*d*V, attention ~8*L*seq*d
per token; recomputation is not useful work, so checkpointing lowers the figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# BENCH_SMOKE=1: a CPU dry run of this script on a tiny model (checks the plumbing, measures nothing).
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
CKPT = "/tmp/bench-tiny" if SMOKE else "/tmp/llama8b"
DEVICE_MAP = {"": "cpu"} if SMOKE else {"": 0}
TOKEN_RANGE = (10, 900) if SMOKE else (1000, 120000)
N_LINEAR = 6.98e9  # linear weights in the 32 decoder layers of Llama-3.1-8B
HIDDEN, VOCAB, LAYERS = 4096, 128256, 32
PEAK_TFLOPS = 989e12  # H100 SXM dense bf16


def _cuda(name: str, default=None):
    import torch

    return getattr(torch.cuda, name)() if torch.cuda.is_available() else default


def useful_flops_per_token(seq: int) -> float:
    return 4 * N_LINEAR + 4 * HIDDEN * VOCAB + 8 * LAYERS * seq * HIDDEN


def real_texts(n_rows: int, max_len: int, seed: int = 0) -> list[str]:
    """Rows of text with lengths like an instruction dataset's (alpaca-like): log-normal, median ~250 tokens of the
    checkpoint's tokenizer, long tail cut at max_len. Words from the quickstart data; the same texts go to the
    recipe (tokenized here, real_token_rows) and to `loraft train` (as a .jsonl of text rows)."""
    import random

    import torch
    from transformers import AutoTokenizer

    words = Path(__file__).resolve().parents[1].joinpath("recipes/data/quickstart_train.jsonl").read_text().split()
    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    sample = " ".join(words[:20000])
    words_per_token = len(sample.split()) / len(tokenizer(sample, add_special_tokens=False)["input_ids"])
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n_rows, generator=g) * 0.8 + 5.52).clamp(16, max_len).long()  # e^5.52 ~ 250
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(max(1, int(n * words_per_token)))) for n in lengths.tolist()]


def real_token_rows(n_rows: int, max_len: int, seed: int = 0) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CKPT)
    return [{"input_ids": tokenizer(t)["input_ids"][:max_len]} for t in real_texts(n_rows, max_len, seed)]


def motif_rows(n_rows: int, seq: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        motif = torch.randint(*TOKEN_RANGE, (64,), generator=g)
        rows.append({"input_ids": motif.repeat(seq // 64 + 1)[:seq].tolist()})
    return rows


def run_one(tool: str, mode: str, batch: int, seq: int, steps: int, gc: str, liger: str, offload: bool = False,
            fused: bool = True, profile: Path | None = None, kernels: str = "auto", stock: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Step times and losses; with `profile`, a kernel table and launch/sync counts of the last two steps
        (left out of the timing)."""

        def __init__(self):
            self.t, self.losses, self.profiler, self.counts = [], [], None, None

        def on_step_end(self, args, state, control, **kw):
            _cuda("synchronize")
            self.t.append(time.perf_counter())
            if profile and state.global_step == steps - 2:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                   torch.profiler.ProfilerActivity.CUDA])
                self.profiler.__enter__()
            elif self.profiler is not None and state.global_step == steps:
                self.profiler.__exit__(None, None, None)
                self.counts = profile_counts(self.profiler, 2, self.t[-1] - self.t[-3])
                table = self.profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
                Path(profile).write_text(json.dumps(self.counts) + "\n" + table)
                self.profiler = None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 5))

    clock = Clock()
    real = mode == "real"
    raw_rows = real_token_rows(batch * (steps + 1) * (8 if real else 1), seq) if real else motif_rows(batch * (steps + 1), seq)
    rows = Dataset.from_list(raw_rows)
    mean_len = sum(len(r["input_ids"]) for r in raw_rows) / len(raw_rows)
    torch.manual_seed(0)
    if tool == "anchor":
        trainer, plan = _anchor_trainer(mode, batch, seq, steps, rows, clock)
    else:
        trainer, plan = _loraft_trainer(mode, batch, seq, steps, rows, clock, gc, liger, offload, fused, kernels, stock)
    _cuda("reset_peak_memory_stats")
    trainer.train()
    warm = 2
    timed = clock.t[:-2] if profile else clock.t  # profiled steps run slower
    dt = (timed[-1] - timed[warm - 1]) / (len(timed) - warm)
    tok_s = batch * seq / dt
    if real:
        # Real (non-padding) tokens per step: unpacked, a step consumes `batch` rows; packed (BFD), `batch` bins
        # holding on average (real tokens / number of bins) each.
        packed = getattr(trainer.train_dataset, "num_rows", None)
        per_step = batch * mean_len if tool == "anchor" else batch * (mean_len * len(raw_rows) / packed)
        tok_s = per_step / dt
    return {
        "tool": tool, "mode": mode, "batch": batch, "seq": seq, "steps": steps, "plan": plan,
        "step_s": round(dt, 4), "tokens_per_s": round(tok_s, 1),
        "peak_gib": round(_cuda("max_memory_allocated", 0) / 2**30, 2),
        "lora_mfu": round(tok_s * useful_flops_per_token(seq) / PEAK_TFLOPS, 4),
        "losses": clock.losses, "gpu": _cuda("get_device_name", "cpu (smoke)"),
        **({"profile": clock.counts} if clock.counts else {}),
    }


def profile_counts(profiler, steps: int, wall_s: float) -> dict:
    """Per step: CUDA kernels run, host syncs (stream/device synchronize: every .item(), bool(), nonzero...),
    GPU kernel time, and the wall time the GPU ran no kernel."""
    from torch.autograd import DeviceType

    kernels = [e for e in profiler.events() if e.device_type == DeviceType.CUDA]
    syncs = [e for e in profiler.events() if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize")]
    busy = sum(e.device_time for e in kernels) / 1e6  # us -> s (streams rarely overlap here)
    return {"kernels_per_step": round(len(kernels) / steps), "host_syncs_per_step": round(len(syncs) / steps, 1),
            "gpu_kernel_s_per_step": round(busy / steps, 4), "wall_s_per_step": round(wall_s / steps, 4),
            "gpu_idle_s_per_step": round(max(wall_s - busy, 0.0) / steps, 4)}


def _sft_args(batch, seq, steps, **extra):
    from trl import SFTConfig

    settings = dict(output_dir="/tmp/bench-out", max_steps=steps, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="cosine",
                    warmup_steps=0.03, logging_steps=1, save_strategy="no", bf16=True, max_length=seq,
                    report_to=[], packing=False, dataloader_num_workers=0, seed=42, use_cpu=SMOKE)
    return SFTConfig(**{**settings, **extra})


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
                                   pad_token="<pad>", unk_token="<unk>", eos_token="<unk>")


def _anchor_trainer(mode, batch, seq, steps, rows, clock):
    """The seed recipe, line for line (../shared/bench/seed_recipe_baseline.py)."""
    from trl import SFTTrainer

    model, plan = _anchor_model(mode)
    args = _sft_args(batch, seq, steps, gradient_checkpointing=True, remove_unused_columns=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=_tokenizer(), callbacks=[clock])
    return trainer, plan


def _anchor_model(mode):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if mode in ("lora", "real"):
        model = AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.bfloat16, device_map=DEVICE_MAP)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(CKPT, quantization_config=bnb, dtype=torch.bfloat16, device_map=DEVICE_MAP)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    return model, {"gradient_checkpointing": "all", "liger": False, "optimizer": "adamw_torch"}


def _loraft_trainer(mode, batch, seq, steps, rows, clock, gc, liger, offload=False, fused=True, kernels="auto", stock=False):
    """loraft's own path: load_base_model, attach_lora, plan_speed, apply_speed_plan, its SFTConfig choices.
    stock: the Trainer as it was before speed.SyncFreeSteps (host syncs inside every step), for the A/B."""
    model, plan = _loraft_model(mode, batch, seq, gc, liger, fused, kernels, offload)
    extra = {"packing": True, "packing_strategy": "bfd"} if mode == "real" else {}
    extra["activation_offloading"] = offload
    extra["logging_nan_inf_filter"] = stock  # as lora_ft.training.sft.trainer_arguments sets it (False) unless stock
    args = _sft_args(batch, seq, steps, gradient_checkpointing=False, use_liger_kernel=plan.liger, optim=plan.optimizer, **extra)
    trainer = _loraft_sft_trainer(model=model, args=args, train_dataset=rows, processing_class=_tokenizer(), callbacks=[clock],
                                  stock=stock)
    return trainer, {**plan.to_json(), "activation_offloading": offload, **({"trainer": "stock"} if stock else {})}


def _loraft_model(mode, batch, seq, gc, liger, fused, kernels="auto", offload=False):
    from lora_ft.config_io import validate_dict
    from lora_ft.model.loading import attach_lora, load_base_model, resolve_model_source
    from lora_ft.model.speed import apply_speed_plan, plan_speed

    gc_value = {"true": True, "false": False, "auto": "auto"}.get(gc, True)
    raw = {
        "model": {"name": CKPT, "dtype": "bfloat16"},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "data": {"train": "unused.jsonl"},
        "training": {"batch_size": batch, "max_seq_length": seq, "precision": "bf16", "gradient_checkpointing": gc_value,
                     "liger": {"true": True, "false": False}.get(liger, "auto"), "fused_lora": fused,
                     "lora_kernels": kernels, "activation_offloading": offload},
    }
    if mode == "qlora":
        raw["model"]["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True}
    cfg = validate_dict(raw)
    source = resolve_model_source(cfg.model)
    model = load_base_model(cfg.model, source, "bf16", device_map=DEVICE_MAP)
    from transformers import AutoConfig

    trainable = 16 * 32 * (4096 * 2 + 4096 + 1024 * 2 + 4096 * 2 + (4096 + 14336) * 3)
    plan = plan_speed(cfg, AutoConfig.from_pretrained(CKPT), trainable=trainable)
    if gc.isdigit():
        plan = dataclasses.replace(plan, checkpoint_layers=int(gc))
    model = attach_lora(model, cfg.lora)
    apply_speed_plan(model, plan)
    return model, plan


def probe_longest(tool: str, mode: str, lengths: list[int], search: bool, ceiling: int = 1 << 20) -> dict:
    """Longest sequence that trains one full step (forward, backward, optimizer) at batch 1, in one process.

    search: double from lengths[0] until a step fails, then bisect to 1,024 tokens. Otherwise try each length
    once (used for loraft at a multiple of the anchor's longest: every probe there costs minutes)."""
    import gc

    import torch

    trials, model = [], None

    def trial(seq: int) -> bool:
        nonlocal model
        rows = motif_rows(1, seq)
        _cuda("empty_cache")
        _cuda("reset_peak_memory_stats")
        start = time.perf_counter()
        try:
            trainer, model = _probe_trainer(tool, mode, seq, rows, model)
            trainer.train()
            ok, error = True, None
        except torch.OutOfMemoryError:
            ok, error = False, "out of memory"
        except RuntimeError as exc:  # cuBLAS / bitsandbytes report some allocation failures this way
            if "memory" not in str(exc).lower() and "CUBLAS" not in str(exc):
                raise
            ok, error = False, str(exc).splitlines()[0][:200]
        trainer = None
        for param in model.parameters():
            param.grad = None
        gc.collect()
        _cuda("empty_cache")
        trials.append({"seq": seq, "ok": ok, "peak_gib": round(_cuda("max_memory_allocated", 0) / 2**30, 2),
                       "seconds": round(time.perf_counter() - start, 1), **({"error": error} if error else {})})
        print(json.dumps(trials[-1]), file=sys.stderr, flush=True)
        return ok

    if search:
        good, bad, seq = 0, None, lengths[0]
        while bad is None:
            if trial(seq):
                good, seq = seq, seq * 2
                if seq > ceiling:
                    bad = good  # fits at the ceiling: nothing to bisect
            else:
                bad = seq
        while bad - good > 1024:
            middle = (good + bad) // 2 // 1024 * 1024
            good, bad = (middle, bad) if trial(middle) else (good, middle)
        longest = good
    else:
        longest = max((s for s in lengths if trial(s)), default=0)
    return {"tool": tool, "mode": mode, "batch": 1, "longest_seq": longest, "trials": trials,
            "gpu": _cuda("get_device_name", "cpu (smoke)")}


def _probe_trainer(tool, mode, seq, rows, model):
    """A one-step trainer at batch 1; the model (PEFT-wrapped) is built once and reused between trials."""
    from datasets import Dataset
    from trl import SFTTrainer

    rows = Dataset.from_list(rows)
    if tool == "anchor":
        if model is None:
            model, _ = _anchor_model(mode)
        args = _sft_args(1, seq, 1, gradient_checkpointing=True, remove_unused_columns=True)
        return SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=_tokenizer()), model
    if model is None:
        model, plan = _loraft_model(mode, 1, seq, "true", "auto", fused=True, offload=not SMOKE)
        model.loraft_plan = plan
    plan = model.loraft_plan
    args = _sft_args(1, seq, 1, gradient_checkpointing=False, use_liger_kernel=plan.liger, optim=plan.optimizer,
                     activation_offloading=not SMOKE)
    return _loraft_sft_trainer(model=model, args=args, train_dataset=rows, processing_class=_tokenizer()), model


def _loraft_sft_trainer(stock: bool = False, **kwargs):
    """loraft's own Trainer class, with its per-step finiteness guard (its cost counts); no checkpoints are saved.
    stock: SFTTrainer with the guard read back after every backward, as loraft's Trainer was before SyncFreeSteps."""
    from rich.console import Console
    from trl import SFTTrainer

    from lora_ft.training.guards import NumericGuard
    from lora_ft.training.sft import LoraftTrainer

    guard = NumericGuard("stop", 0, None, Console(stderr=True), "")
    if not stock:
        return LoraftTrainer(writer=None, guard=guard, **kwargs)

    class StockTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            guard.after_backward(model, loss, step=self.state.global_step + 1, sync=self.accelerator.sync_gradients)
            return loss

    return StockTrainer(**kwargs)


# Every case is one subprocess. Memory comparisons keep checkpointing on (the terms); throughput uses
# loraft's automatic plan. "unfused" runs loraft's path with PEFT's own LoRA forward (fused_lora: false), so the
# table shows what that lever alone is worth. mode real: variable-length rows (median ~250 tokens); the anchor
# pads each batch, loraft packs (BFD, padding-free).
CASES = [
    {"id": "anchor-lora", "tool": "anchor", "mode": "lora"},
    {"id": "lora-auto", "tool": "loraft", "mode": "lora", "gc": "auto"},
    {"id": "lora-auto-stock", "tool": "loraft", "mode": "lora", "gc": "auto", "stock": True},
    {"id": "lora-auto-torch-kernels", "tool": "loraft", "mode": "lora", "gc": "auto", "kernels": "torch"},
    {"id": "lora-auto-unfused", "tool": "loraft", "mode": "lora", "gc": "auto", "fused": False},
    {"id": "lora-gc", "tool": "loraft", "mode": "lora", "gc": "true"},
    {"id": "lora-gc-offload", "tool": "loraft", "mode": "lora", "gc": "true", "offload": True},
    {"id": "anchor-qlora", "tool": "anchor", "mode": "qlora"},
    {"id": "qlora-auto", "tool": "loraft", "mode": "qlora", "gc": "auto"},
    {"id": "qlora-gc", "tool": "loraft", "mode": "qlora", "gc": "true"},
    {"id": "qlora-gc-offload", "tool": "loraft", "mode": "qlora", "gc": "true", "offload": True},
    {"id": "cli-llama8b", "tool": "cli", "mode": "lora", "config": "llama8b"},
    {"id": "cli-llama8b-qlora", "tool": "cli", "mode": "qlora", "config": "llama8b-qlora"},
    {"id": "anchor-real", "tool": "anchor", "mode": "real"},
    {"id": "real-auto", "tool": "loraft", "mode": "real", "gc": "auto"},
    # `loraft train` on the anchor-real texts: the shipped config as it is (padded batches: padding_free auto is
    # off under sdpa), with data.packing, and with data.padding_free; and full-length rows padding-free
    {"id": "cli-llama8b-real", "tool": "cli", "mode": "real", "config": "llama8b", "rows": "real"},
    {"id": "cli-llama8b-real-packed", "tool": "cli", "mode": "real", "config": "llama8b", "rows": "real",
     "set": ["data.packing=true"]},
    {"id": "cli-llama8b-real-padfree", "tool": "cli", "mode": "real", "config": "llama8b", "rows": "real",
     "set": ["data.padding_free=true"]},
    {"id": "cli-llama8b-padfree", "tool": "cli", "mode": "lora", "config": "llama8b", "set": ["data.padding_free=true"]},
]


def case_command(case: dict, batch: int, seq: int, steps: int) -> list[str]:
    if case["tool"] == "cli":
        cmd = [sys.executable, __file__, "cli", case["config"], "--steps", str(steps + 10), "--batch", str(batch), "--seq", str(seq)]
        cmd += ["--rows", case["rows"]] if case.get("rows") else []
        for item in case.get("set", []):
            cmd += ["--set", item]
        return cmd
    cmd = [sys.executable, __file__, "one", case["tool"], case["mode"], str(batch), str(seq), str(steps),
           "--gc", case.get("gc", "true"), "--liger", case.get("liger", "auto")]
    cmd += ["--offload"] if case.get("offload") else []
    cmd += ["--unfused"] if case.get("fused") is False else []
    cmd += ["--torch-lora-kernels"] if case.get("kernels") == "torch" else []
    cmd += ["--stock-trainer"] if case.get("stock") else []
    cmd += ["--profile", str(case["profile"])] if case.get("profile") else []
    return cmd


def drive(steps: int, batch: int, seq: int, out: Path | None, only: str | None = None, skip_unfused: bool = False,
          profile: str | None = None) -> None:
    """Run the cases (those in `only`, in that order, or all); `profile`: case ids that also write a kernel table
    and launch counts (their last two steps, untimed) next to `out`."""
    _ensure_checkpoint()
    chosen = [c for c in CASES if not (skip_unfused and c.get("fused") is False)]
    if only:
        wanted = only.split(",")
        chosen = [c for w in wanted for c in chosen if w in (c["id"], c["mode"])]
    profiled = set(profile.split(",")) if profile else set()
    results = []
    for case in chosen:
        if case["id"] in profiled:
            case = {**case, "profile": (out.parent if out else Path(".")) / f"profile_{case['id']}.txt"}
        cmd = case_command(case, batch, seq, steps)
        results.append(_run_json(cmd, case))
        _write(out, results)  # after every case: a run cut short keeps what it measured
    _compare(results)
    _write(out, results)


def run_cli(config: str, steps: int, batch: int, seq: int, extra: list[str], rows: str = "long") -> dict:
    """`loraft train configs/CONFIG.yaml` as a user runs it, on the shared random checkpoint. rows "long": text
    long enough that every row is truncated to `seq` tokens (so each step is batch x seq tokens, as for the anchor);
    "real": real_texts (alpaca-like lengths), the very texts the anchor's real mode trains on.
    Overrides: the model and data paths, no held-out split, max_steps, logging every 5 steps, no mid-run
    checkpoint, and gradient_accumulation_steps 1 (the anchor's optimizer-step share). tokens/s: steps 6 to the
    end, from metrics.jsonl (non-padding tokens over wall time between those log lines)."""
    import random

    _ensure_checkpoint()
    work = Path("/tmp/bench-cli")
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"train-{rows}.jsonl"
    words = Path(__file__).resolve().parents[1].joinpath("recipes/data/quickstart_train.jsonl").read_text().split()
    rng = random.Random(0)
    with data.open("w") as handle:
        if rows == "real":  # enough rows for `steps` packed steps of batch x seq tokens
            for text in real_texts(batch * (steps + 1) * 16, seq):
                handle.write(json.dumps({"text": text}) + "\n")
        else:
            for _ in range(batch * steps + batch):
                handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq * 2))}) + "\n")
    name = config + ("-real" if rows == "real" else "")
    run_dir = work / name
    overrides = [f"model.name={CKPT}", f"data.train={data}", "data.eval_fraction=0", f"training.max_steps={steps}",
                 "training.logging_steps=5", "training.save_steps=100000", "training.gradient_accumulation_steps=1",
                 f"training.batch_size={batch}", f"training.max_seq_length={seq}", f"output_dir={run_dir}", *extra]
    cmd = [sys.executable, "-m", "lora_ft", "train", f"configs/{config}.yaml", "--overwrite"]
    for item in overrides:
        cmd += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - started
    shown = "loraft train configs/%s.yaml %s" % (config, " ".join(f"--set {o}" for o in overrides))
    if proc.returncode != 0:
        return {"tool": "cli", "config": config, "error": proc.stderr[-1500:], "command": shown}
    from lora_ft.training.progress import read_metrics

    logs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and "num_input_tokens_seen" in r]
    first = next(r for r in logs if r["step"] >= 5)
    last = logs[-1]
    tok_s = (last["num_input_tokens_seen"] - first["num_input_tokens_seen"]) / (last["elapsed_s"] - first["elapsed_s"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    lines = [l for l in proc.stderr.splitlines() if "tok/s" in l or l.startswith("speed:")]
    mode = "real" if rows == "real" else "qlora" if "qlora" in config else "lora"
    return {"tool": "cli", "config": config, "mode": mode, "rows": rows, "extra": extra, "batch": batch, "seq": seq,
            "steps": steps, "plan": manifest["speed"], "step_s": round(batch * seq / tok_s, 4), "tokens_per_s": round(tok_s, 1),
            "peak_gib": manifest["metrics"]["peak_gpu_memory_gib"] or 0.0,
            "lora_mfu": round(tok_s * useful_flops_per_token(seq) / PEAK_TFLOPS, 4),
            "losses": [r["loss"] for r in logs], "console": lines[-4:], "wall_s": round(wall, 1),
            "gpu": manifest["environment"]["device"], "command": shown}


def drive_probe(mode: str, out: Path | None, start: int, factor: float, ceiling: int) -> None:
    """The anchor's longest batch-1 sequence by search, then loraft at `factor` times it."""
    _ensure_checkpoint()
    log = out.with_suffix(".log") if out else None
    anchor = _run_json([sys.executable, __file__, "probe-one", "anchor", mode, "--search", str(start), "--ceiling", str(ceiling)],
                       {"tool": "anchor"}, log)
    results = [anchor]
    if anchor.get("longest_seq"):
        target = int(anchor["longest_seq"] * factor + 1023) // 1024 * 1024
        ours = _run_json([sys.executable, __file__, "probe-one", "loraft", mode, str(target)], {"tool": "loraft"}, log)
        ours["vs_anchor"] = round(ours.get("longest_seq", 0) / anchor["longest_seq"], 2)
        results.append(ours)
    _write(out, results)


def _ensure_checkpoint() -> None:
    if not Path(CKPT, "config.json").exists():
        shape = "tiny" if SMOKE else "llama8b"
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_random_model.py")), shape, CKPT], check=True)


def _run_json(cmd: list[str], case: dict, log: Path | None = None) -> dict:
    """Run one case; with `log`, its stderr (a probe's trial lines) streams there as it runs."""
    if log is None:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        stdout, stderr = proc.stdout, proc.stderr
    else:
        with log.open("a") as sink:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=sink, text=True)
        stdout, stderr = proc.stdout, log.read_text()
    line = next((l for l in reversed(stdout.splitlines()) if l.startswith("{")), None)
    result = json.loads(line) if line else {**case, "error": stderr[-1500:]}
    result["command"] = " ".join(["python", "scripts/bench_train.py"] + cmd[2:])
    print(json.dumps(result), flush=True)
    return result


def _write(out: Path | None, results: list[dict]) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


def _compare(results: list[dict]) -> None:
    anchors = {r["mode"]: r for r in results if r.get("tool") == "anchor" and "tokens_per_s" in r}
    print(f"{'case':<34}{'tok/s':>9}{'x anchor':>10}{'peak GiB':>10}{'x anchor':>10}{'MFU':>7}{'loss@end':>10}{'dloss':>8}")
    for r in results:
        if "tokens_per_s" not in r:
            print(f"{r['tool']} {r['mode']}: failed")
            continue
        a = anchors.get(r["mode"])
        offloaded = " offload" if r["plan"].get("activation_offloading") else ""
        unfused = " unfused" if r["plan"].get("fused_lora") is False else ""
        unfused += " torch-kernels" if r["plan"].get("lora_kernels") == "torch" else ""
        unfused += " stock-trainer" if r["plan"].get("trainer") == "stock" else ""
        unfused += f" {r['plan']['batching']}" if r["plan"].get("batching") and r["mode"] == "real" else ""
        name = f"{r.get('config', r['tool'])} {r['mode']} {r['plan'].get('checkpoint_layers', r['plan'].get('gradient_checkpointing'))}{offloaded}{unfused}"
        speed = r["tokens_per_s"] / a["tokens_per_s"] if a else float("nan")
        mem = r["peak_gib"] / a["peak_gib"] if a and a["peak_gib"] else float("nan")
        comparable = a and r["tool"] != "cli"  # the CLI trains on text rows, not the anchor's token rows
        dloss = abs(r["losses"][-1] - a["losses"][-1]) / a["losses"][-1] if comparable else float("nan")
        r["vs_anchor"] = {"throughput": round(speed, 3), "peak_memory": round(mem, 3), "final_loss_rel_diff": round(dloss, 5)}
        print(f"{name:<34}{r['tokens_per_s']:>9.0f}{speed:>10.2f}{r['peak_gib']:>10.2f}{mem:>10.2f}{r['lora_mfu']:>7.3f}"
              f"{r['losses'][-1]:>10.4f}{dloss:>8.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one")
    one.add_argument("tool", choices=["anchor", "loraft"])
    one.add_argument("mode", choices=["lora", "qlora", "real"])
    one.add_argument("batch", type=int)
    one.add_argument("seq", type=int)
    one.add_argument("steps", type=int)
    one.add_argument("--gc", default="true")
    one.add_argument("--liger", default="auto")
    one.add_argument("--offload", action="store_true", help="activation offloading to CPU")
    one.add_argument("--unfused", action="store_true", help="PEFT's own LoRA forward (fused_lora: false)")
    one.add_argument("--profile", type=Path, help="write a kernel-time table of steps 5-6 here")
    one.add_argument("--torch-lora-kernels", action="store_true", help="fused LoRA on torch ops, not the Triton kernels")
    one.add_argument("--stock-trainer", action="store_true", help="host syncs inside every step, as before SyncFreeSteps")
    cli = sub.add_parser("cli", help="loraft train configs/CONFIG.yaml through the CLI")
    cli.add_argument("config")
    cli.add_argument("--steps", type=int, default=30)
    cli.add_argument("--batch", type=int, default=4)
    cli.add_argument("--seq", type=int, default=2048)
    cli.add_argument("--set", dest="extra", action="append", default=[], help="more loraft --set overrides")
    cli.add_argument("--rows", choices=["long", "real"], default="long", help="real: alpaca-like lengths (real_texts)")
    every = sub.add_parser("all")
    every.add_argument("--steps", type=int, default=20)
    every.add_argument("--batch", type=int, default=4)
    every.add_argument("--seq", type=int, default=2048)
    every.add_argument("--out", type=Path)
    every.add_argument("--only", help="comma-separated modes (lora,qlora,real) or case ids (see CASES) to run")
    every.add_argument("--skip-unfused", action="store_true", help="leave out the fused_lora: false comparison")
    every.add_argument("--profile", help="comma-separated case ids that also write a kernel table and launch counts")
    probe = sub.add_parser("probe", help="longest batch-1 sequence: anchor by search, loraft at --factor times it")
    probe.add_argument("--mode", default="qlora", choices=["lora", "qlora"])
    probe.add_argument("--start", type=int, default=16384)
    probe.add_argument("--factor", type=float, default=4.0)
    probe.add_argument("--ceiling", type=int, default=1 << 20)
    probe.add_argument("--out", type=Path)
    probe_one = sub.add_parser("probe-one")
    probe_one.add_argument("tool", choices=["anchor", "loraft"])
    probe_one.add_argument("mode", choices=["lora", "qlora"])
    probe_one.add_argument("lengths", type=int, nargs="+", help="lengths to try (with --search: the first one)")
    probe_one.add_argument("--search", action="store_true")
    probe_one.add_argument("--ceiling", type=int, default=1 << 20, help="stop the search here")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "tool", None) == "loraft":
        from lora_ft.cli_common import COMMAND_ENV  # what the loraft CLI sets before CUDA starts

        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", COMMAND_ENV["PYTORCH_CUDA_ALLOC_CONF"])
    if args.cmd == "one":
        print(json.dumps(run_one(args.tool, args.mode, args.batch, args.seq, args.steps, args.gc, args.liger, args.offload,
                                 not args.unfused, args.profile, "torch" if args.torch_lora_kernels else "auto",
                                 args.stock_trainer)), flush=True)
    elif args.cmd == "cli":
        print(json.dumps(run_cli(args.config, args.steps, args.batch, args.seq, args.extra, args.rows)), flush=True)
    elif args.cmd == "probe-one":
        print(json.dumps(probe_longest(args.tool, args.mode, args.lengths, args.search, args.ceiling)), flush=True)
    elif args.cmd == "probe":
        drive_probe(args.mode, args.out, args.start, args.factor, args.ceiling)
    else:
        drive(args.steps, args.batch, args.seq, args.out, args.only, args.skip_unfused, args.profile)


if __name__ == "__main__":
    main()
