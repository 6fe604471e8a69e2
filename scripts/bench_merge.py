"""Peak memory and speed of `loraft merge` on an 8B-shaped checkpoint (random weights).

Builds, in a temporary folder, a bf16 checkpoint with Llama-3.1-8B's shapes (hidden 4096,
intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256: 16 GB) in ~5 GB shards, and a
random rank-16 adapter on all 7 projections with a loraft manifest; runs `loraft merge` in a
subprocess under /usr/bin/time -v (peak RSS of the process) while polling its RSS; writes
scripts/results/merge_8b.json; deletes the ~32 GB of temporary files.

    nice -n 10 python scripts/bench_merge.py               # the measurement (~16 GB in, ~16 GB out)
    python scripts/bench_merge.py --layers 1 --no-save     # a quick smoke run

Random weights are fine here: memory and time do not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_ft.artifacts.shards import ShardWriter  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256
HEAD_DIM = HIDDEN // HEADS
PROJECTIONS = {  # name -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--no-save", action="store_true", help="print the result, do not write scripts/results/merge_8b.json")
    args = parser.parse_args()

    tensors = checkpoint_shapes(args.layers)
    need = 2.1 * sum(math.prod(s) for s in tensors.values()) * 2
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        sys.exit(f"{args.tmp}: {free / 1e9:.0f} GB free, the benchmark needs ~{need / 1e9:.0f} GB")
    work = Path(tempfile.mkdtemp(prefix="loraft-bench-merge-", dir=args.tmp))
    try:
        t0 = time.time()
        shards = write_base(work / "base", tensors, args.shard_gb, args.layers)
        write_adapter(work / "adapter", work / "base", args.layers, args.rank)
        build_s = time.time() - t0
        result = run_merge(work / "adapter", work / "out")
        out_bytes = sum(p.stat().st_size for p in (work / "out").glob("*.safetensors"))
        manifest = json.loads((work / "out" / "merge_manifest.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    largest = max(shards)
    report = {
        "what": "loraft merge of a random 8B-shaped bf16 checkpoint (Llama-3.1-8B shapes) with a rank-"
                f"{args.rank} adapter on all 7 projections, CPU",
        "command": "nice -n 10 python scripts/bench_merge.py" + ("" if args.layers == 32 else f" --layers {args.layers}"),
        "merge_command": result["command"],
        "layers": args.layers,
        "params": sum(math.prod(s) for s in tensors.values()),
        "base_shards_bytes": shards,
        "largest_shard_bytes": largest,
        "output_bytes": out_bytes,
        "peak_rss_bytes": result["peak_rss_bytes"],
        "peak_rss_polled_bytes": result["peak_rss_polled_bytes"],
        "peak_rss_over_largest_shard": round(result["peak_rss_bytes"] / largest, 3),
        "goal": "peak RSS < 2x largest shard",
        "goal_met": result["peak_rss_bytes"] < 2 * largest,
        "merge_wall_seconds": round(result["wall_seconds"], 1),
        "shard_pass_seconds": manifest["merge_seconds"],
        "shard_pass_mb_per_s_written": round(manifest["mb_per_s"], 1),
        "read_plus_write_mb_per_s": round((sum(shards) + out_bytes) / 1e6 / manifest["merge_seconds"], 1),
        "per_module_check": manifest["verification"]["per_module"],
        "logits_check": manifest["verification"]["logits_skipped"],
        "build_seconds": round(build_s, 1),
        "disk_write_mb_per_s_while_building": round(sum(shards) / 1e6 / build_s, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_after": os.getloadavg()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "merge_stdout": result["stdout"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if not args.no_save:
        out = ROOT / "scripts" / "results" / "merge_8b.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}")


def checkpoint_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        for name, shape in PROJECTIONS.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_base(folder: Path, shapes: dict, shard_gb: float, layers: int) -> list[int]:
    """Random bf16 tensors streamed to ~shard_gb shards (never a whole shard in memory), with index and config."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if current and size + nbytes > shard_gb * 1e9:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    weight_map, sizes = {}, []
    gen = torch.Generator().manual_seed(0)
    for k, names in enumerate(groups):
        file_name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        with ShardWriter(folder / file_name, [(n, torch.bfloat16, shapes[n]) for n in names]) as writer:
            for name in names:
                std = 1.0 if "norm" in name else 0.02
                writer.write(name, (torch.randn(shapes[name], generator=gen) * std).to(torch.bfloat16))
                weight_map[name] = file_name
        sizes.append((folder / file_name).stat().st_size)
        print(f"base shard {file_name}: {sizes[-1] / 1e9:.2f} GB", flush=True)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False, dtype="bfloat16",
        rope_theta=500000.0, max_position_embeddings=131072,
    ).save_pretrained(folder)
    return sizes


def write_adapter(folder: Path, base: Path, layers: int, rank: int) -> None:
    """A PEFT-format rank-r adapter (fp32, as PEFT trains it) and the manifest loraft's train writes."""
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lora_ft.artifacts.fingerprint import fingerprint_model_path

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for name, (out, inp) in PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) / math.sqrt(inp)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": sorted(n.split(".")[-1] for n in PROJECTIONS), "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "base_model_name_or_path": str(base),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    # A byte-level tokenizer stands in for Llama's: merge copies it, the weights are what is measured.
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(["The capital of France is Paris. Repeat after me: yes"], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>").save_pretrained(folder)
    manifest = {"base_model": {"name": str(base), "fingerprint": fingerprint_model_path(base), "quantization": None}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def run_merge(adapter: Path, out: Path) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "lora_ft", "merge", "--adapter", str(adapter), "--out", str(out)]
    started = time.time()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    polled = {"peak": 0}
    threading.Thread(target=_poll_rss, args=(proc, polled), daemon=True).start()
    stdout, stderr = proc.communicate()
    wall = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"merge failed ({proc.returncode}):\n{stdout}\n{stderr[-3000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return {
        "command": " ".join(["loraft", *command[5:]]),
        "peak_rss_bytes": int(match.group(1)) * 1024,
        "peak_rss_polled_bytes": polled["peak"],
        "wall_seconds": wall,
        "stdout": stdout.strip().splitlines(),
    }


def _poll_rss(proc: subprocess.Popen, polled: dict) -> None:
    """RSS of the merge process (the child of /usr/bin/time), every 0.1 s: a second opinion on the peak."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            for child in parent.children(recursive=True):
                try:
                    polled["peak"] = max(polled["peak"], child.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.1)
    except psutil.NoSuchProcess:
        pass


if __name__ == "__main__":
    main()
