"""Does a model whose base never trained its stop token learn to stop? stories260K, lora.train_tokens auto vs off.

stories260K (../shared/models/stories260K) is a real pretrained base whose `</s>` row is the same vector as
`<unk>` and the byte-fallback rows. This trains the same prompt/completion task twice, with
`lora.train_tokens: auto` (the default: `</s>`'s row trains with the adapter) and `off` (LoRA alone), then
runs `loraft eval` on held-out prompts: the share of greedy generations that stop before the length limit,
and the probability of `</s>` where each held-out answer ends. It also records what the pre-training check
said for each run.

    python scripts/measure_stop_tokens.py            # -> scripts/results/stop_tokens.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Tim", "Sara", "Mia", "Sam"]
COLORS = ["red", "blue", "green", "yellow", "pink", "brown", "white", "black"]
THINGS = ["ball", "car", "hat", "dog", "cat", "box", "kite", "bird", "cup", "bed"]


def task_rows(seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """A templated question: every held-out row is a combination of name, colour and thing not seen in train."""
    combos = list(itertools.product(NAMES, COLORS, THINGS))
    random.Random(seed).shuffle(combos)

    def row(name, color, thing):
        return {"prompt": f"{name} has a {color} {thing}. What color is the {thing}?", "completion": f" The {thing} is {color}."}

    return [row(*c) for c in combos[:n_train]], [row(*c) for c in combos[n_train : n_train + n_eval]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT.parent / "shared" / "models" / "stories260K"))
    parser.add_argument("--out", default=str(ROOT / "scripts" / "results" / "stop_tokens.json"))
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--eval-rows", type=int, default=100)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (Path(args.base) / "config.json").is_file():  # one line, not a traceback, from a plain clone
        sys.exit(f"needs stories260K (or another small Hugging Face model folder): --base PATH; {args.base} is not one "
                 "(it is ../shared/models/stories260K beside the developers' checkout)")

    from lora_ft.config_io import validate_dict
    from lora_ft.evaluate import EvalSettings, evaluate
    from lora_ft.train import preflight, train

    train_rows, eval_rows = task_rows(args.seed, args.train_rows, args.eval_rows)
    results = {
        "command": "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "base": args.base,
        "task": {"train_rows": len(train_rows), "eval_rows": len(eval_rows), "example": train_rows[0]},
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="stop-tokens-") as work:
        work = Path(work)
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        for mode in ("auto", "off"):
            cfg = validate_dict({
                "model": {"name": args.base},
                "lora": {"rank": 8, "dropout": 0.0, "train_tokens": mode},
                # Templated rows are near one another by construction; leakage here means exact copies only.
                "data": {"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl"),
                         "checks": {"leakage": "warn", "duplicates": "off"}},
                "training": {"epochs": args.epochs, "batch_size": 16, "learning_rate": args.learning_rate,
                             "max_seq_length": 64, "precision": "fp32", "seed": args.seed, "logging_steps": 25,
                             "gradient_checkpointing": False},
                "output_dir": str(work / f"run-{mode}"),
            })
            started = time.time()
            check = preflight(cfg)
            result = train(cfg)
            report = evaluate(result.run_dir, regression=[], settings=EvalSettings(batch_size=32), progress=False)
            metrics = report.task["metrics"]
            results["runs"][mode] = {
                "pre_training_check": [line for line in check.summary().splitlines() if line.startswith("stop tokens")],
                "rows_trained": check.token_training.to_json()["rows"],
                "heldout_loss": {"base": metrics["loss"]["base"], "adapter": metrics["loss"]["adapter"]},
                "greedy_generations_that_stop": {"base": metrics["stops"]["base"], "adapter": metrics["stops"]["adapter"],
                                                 "prompts": metrics["stops"]["n"]},
                "exact_match": {"base": metrics["exact_match"]["base"], "adapter": metrics["exact_match"]["adapter"]},
                "stop_probability_at_answer_end": result.stop,
                "train_warning": result.stop.get("warning"),
                "steps": result.manifest["metrics"]["steps"],
                "seconds": round(time.time() - started, 1),
                "example": {k: report.task["examples"][0].get(k) for k in ("prompt", "reference", "adapter_output", "adapter_stopped")},
            }
            print(json.dumps({mode: results["runs"][mode]}, indent=2), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
