"""Training speed and memory: loraft's path against the anchor (plain PEFT + TRL SFTTrainer) in one GPU run.

Identical work for both: a Llama-3.1-8B-shaped model (random weights, one checkpoint on disk shared by
both, so losses are comparable), LoRA r=16 alpha=32 dropout 0.05 on the 7 projections, AdamW, lr 2e-4
cosine, batch x seq tokens per step; rows are a random 64-token motif repeated, so the loss falls and
the curves can be compared step by step ("speed must not change the math").

  python scripts/bench_train.py all --steps 20 --out scripts/results/bench_train.json   (driver: every case below)
  python scripts/bench_train.py one anchor lora 4 2048 20            (one case, one JSON line)
  python scripts/bench_train.py one loraft lora 4 2048 20 --gc auto  (loraft with its automatic plan)

The anchor case follows ../shared/bench/seed_recipe_baseline.py exactly (bf16 autocast, gradient
checkpointing, TRL defaults), except that its weights load from the shared checkpoint. LoRA-MFU counts
useful FLOPs only: frozen linears forward 2N + input-gradient 2N, lm_head 4*d*V, attention ~8*L*seq*d
per token; recomputation is not useful work, so checkpointing lowers the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CKPT = "/tmp/llama8b"
N_LINEAR = 6.98e9  # linear weights in the 32 decoder layers of Llama-3.1-8B
HIDDEN, VOCAB, LAYERS = 4096, 128256, 32
PEAK_TFLOPS = 989e12  # H100 SXM dense bf16


def useful_flops_per_token(seq: int) -> float:
    return 4 * N_LINEAR + 4 * HIDDEN * VOCAB + 8 * LAYERS * seq * HIDDEN


def chat_length_rows(n_rows: int, max_len: int, seed: int = 0) -> list[dict]:
    """Lengths like an instruction dataset's: log-normal, median ~250 tokens, long tail clipped at max_len."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n_rows, generator=g) * 0.8 + 5.52).clamp(16, max_len).long()  # e^5.52 ~ 250
    rows = []
    for n in lengths.tolist():
        motif = torch.randint(1000, 120000, (32,), generator=g)
        rows.append({"input_ids": motif.repeat(n // 32 + 1)[:n].tolist()})
    return rows


def motif_rows(n_rows: int, seq: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        motif = torch.randint(1000, 120000, (64,), generator=g)
        rows.append({"input_ids": motif.repeat(seq // 64 + 1)[:seq].tolist()})
    return rows


def run_one(tool: str, mode: str, batch: int, seq: int, steps: int, gc: str, liger: str, offload: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.t, self.losses = [], []

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 5))

    clock = Clock()
    real = mode == "real"
    raw_rows = chat_length_rows(batch * (steps + 1) * (8 if real else 1), seq) if real else motif_rows(batch * (steps + 1), seq)
    rows = Dataset.from_list(raw_rows)
    mean_len = sum(len(r["input_ids"]) for r in raw_rows) / len(raw_rows)
    torch.manual_seed(0)
    if tool == "anchor":
        trainer, plan = _anchor_trainer(mode, batch, seq, steps, rows, clock)
    else:
        trainer, plan = _loraft_trainer(mode, batch, seq, steps, rows, clock, gc, liger, offload)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    warm = 2
    dt = (clock.t[-1] - clock.t[warm - 1]) / (len(clock.t) - warm)
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
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "lora_mfu": round(tok_s * useful_flops_per_token(seq) / PEAK_TFLOPS, 4),
        "losses": clock.losses, "gpu": torch.cuda.get_device_name(),
    }


def _sft_args(batch, seq, steps, **extra):
    from trl import SFTConfig

    settings = dict(output_dir="/tmp/bench-out", max_steps=steps, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="cosine",
                    warmup_steps=0.03, logging_steps=1, save_strategy="no", bf16=True, max_length=seq,
                    report_to=[], packing=False, dataloader_num_workers=0, seed=42)
    return SFTConfig(**{**settings, **extra})


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
                                   pad_token="<pad>", unk_token="<unk>", eos_token="<unk>")


def _anchor_trainer(mode, batch, seq, steps, rows, clock):
    """The seed recipe, line for line (../shared/bench/seed_recipe_baseline.py)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTTrainer

    if mode in ("lora", "real"):
        model = AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.bfloat16, device_map={"": 0})
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(CKPT, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    args = _sft_args(batch, seq, steps, gradient_checkpointing=True, remove_unused_columns=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=_tokenizer(), callbacks=[clock])
    return trainer, {"gradient_checkpointing": "all", "liger": False, "optimizer": "adamw_torch"}


def _loraft_trainer(mode, batch, seq, steps, rows, clock, gc, liger, offload=False):
    """loraft's own path: load_base_model, attach_lora, plan_speed, apply_checkpointing, its SFTConfig choices."""
    from trl import SFTTrainer

    from lora_ft.config import validate_dict
    from lora_ft.model import attach_lora, load_base_model, resolve_model_source
    from lora_ft.speed import apply_checkpointing, plan_speed

    gc_value = {"true": True, "false": False, "auto": "auto"}.get(gc, True)
    raw = {
        "model": {"name": CKPT, "dtype": "bfloat16"},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "data": {"train": "unused.jsonl"},
        "training": {"batch_size": batch, "max_seq_length": seq, "precision": "bf16", "gradient_checkpointing": gc_value,
                     "liger": {"true": True, "false": False}.get(liger, "auto")},
    }
    if mode == "qlora":
        raw["model"]["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True}
    cfg = validate_dict(raw)
    source = resolve_model_source(cfg.model)
    model = load_base_model(cfg.model, source, "bf16", device_map={"": 0})
    from transformers import AutoConfig

    trainable = 16 * 32 * (4096 * 2 + 4096 + 1024 * 2 + 4096 * 2 + (4096 + 14336) * 3)
    plan = plan_speed(cfg, AutoConfig.from_pretrained(CKPT), trainable=trainable)
    if gc.isdigit():
        plan = type(plan)(plan.liger, int(gc), plan.total_layers, plan.optimizer)
    model = attach_lora(model, cfg.lora)
    apply_checkpointing(model, plan.checkpoint_layers)
    extra = {"packing": True, "packing_strategy": "bfd"} if mode == "real" else {}
    extra["activation_offloading"] = offload
    args = _sft_args(batch, seq, steps, gradient_checkpointing=False, use_liger_kernel=plan.liger, optim=plan.optimizer, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=_tokenizer(), callbacks=[clock])
    return trainer, {**plan.to_json(), "activation_offloading": offload}


CASES = [
    # (tool, mode, gc, liger): memory comparisons keep checkpointing on; throughput uses loraft's auto plan.
    # mode real: variable-length rows (median ~250 tokens); the anchor pads each batch, loraft packs (BFD, padding-free).
    ("anchor", "lora", "-", "-"),
    ("loraft", "lora", "true", "auto"),
    ("loraft", "lora", "auto", "auto"),
    ("anchor", "qlora", "-", "-"),
    ("loraft", "qlora", "true", "auto"),
    ("loraft", "qlora", "auto", "auto"),
    ("anchor", "real", "-", "-"),
    ("loraft", "real", "auto", "auto"),
    # memory: checkpointing on plus activation offloading (mode names with +offload)
    ("loraft", "lora+offload", "true", "auto"),
    ("loraft", "qlora+offload", "true", "auto"),
]


def drive(steps: int, batch: int, seq: int, out: Path | None, only: str | None = None) -> None:
    if not Path(CKPT, "config.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_random_model.py")), "llama8b", CKPT], check=True)
    results = []
    for tool, mode, gc, liger in CASES:
        wanted = only.split(",") if only else None
        anchor_needed = tool == "anchor" and wanted and any(w.split("+")[0] == mode for w in wanted)
        if wanted and mode not in wanted and not anchor_needed:
            continue
        base_mode, _, offload = mode.partition("+")
        cmd = [sys.executable, __file__, "one", tool, base_mode, str(batch), str(seq), str(steps), "--gc", gc, "--liger", liger]
        cmd += ["--offload"] if offload else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("{")), None)
        result = json.loads(line) if line else {"tool": tool, "mode": mode, "error": proc.stderr[-1500:]}
        result["command"] = " ".join(["python", "scripts/bench_train.py"] + cmd[2:])
        print(json.dumps(result), flush=True)
        results.append(result)
    _compare(results)
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
        name = f"{r['tool']} {r['mode']} {r['plan'].get('checkpoint_layers', r['plan'].get('gradient_checkpointing'))}{offloaded}"
        speed = r["tokens_per_s"] / a["tokens_per_s"] if a else float("nan")
        mem = r["peak_gib"] / a["peak_gib"] if a else float("nan")
        dloss = abs(r["losses"][-1] - a["losses"][-1]) / a["losses"][-1] if a else float("nan")
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
    every = sub.add_parser("all")
    every.add_argument("--steps", type=int, default=20)
    every.add_argument("--batch", type=int, default=4)
    every.add_argument("--seq", type=int, default=2048)
    every.add_argument("--out", type=Path)
    every.add_argument("--only", help="comma-separated modes to run (lora,qlora,real)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cmd == "one":
        print(json.dumps(run_one(args.tool, args.mode, args.batch, args.seq, args.steps, args.gc, args.liger, args.offload)), flush=True)
    else:
        drive(args.steps, args.batch, args.seq, args.out, args.only)


if __name__ == "__main__":
    main()
