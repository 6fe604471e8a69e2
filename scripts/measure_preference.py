"""Preference tuning on a real base: does DPO through `loraft train` teach a property the base does not prefer?

Base: ../shared/models/stories260K (a 260K-parameter Llama trained on TinyStories). Task, built here: a story
opening about a child; the chosen continuation has the child play with a dog, the rejected one with another
thing (ball, doll, kite, ...), same length in tokens. Train and held-out pairs use different names and openings.
Measured: held-out preference accuracy (length-normalised log p of chosen above rejected) of the base and
the adapter (`loraft eval`), the share of held-out prompts whose greedy continuation mentions a dog, and the
same data with identical pairs planted run through `loraft data check` (the identical_pairs check must fire).

    python scripts/measure_preference.py            # writes scripts/results/preference.json (~2 min on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_ft.config_io import load_config  # noqa: E402
from lora_ft.data_check import check_data  # noqa: E402
from lora_ft.evaluate import EvalSettings, evaluate  # noqa: E402
from lora_ft.train import train  # noqa: E402

# ../shared from the main checkout (a worktree one level deeper finds it two levels up); or STORIES260K=path
BASE = Path(os.environ["STORIES260K"]) if "STORIES260K" in os.environ else next((p / "shared" / "models" / "stories260K" for p in (REPO.parent, REPO.parent.parent)
             if (p / "shared" / "models" / "stories260K").is_dir()), REPO.parent / "shared" / "models" / "stories260K")
OUT = REPO / "scripts" / "results" / "preference.json"
TRAIN_NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Tim", "Mia", "Sam", "Lucy", "Jack", "Amy"]
HELD_OUT_NAMES = ["Sara", "Bob", "Kim", "Joe", "Zoe", "Dan"]
OPENINGS = [
    "Once upon a time, there was a little {kid} named {name}. {He} liked to play",
    "One day, a little {kid} named {name} went to the park. {He} wanted to play",
    "{name} was a happy {kid}. Every day, {he} went outside to play",
]
TRAIN_OPENING = OPENINGS[:2]
HELD_OUT_OPENING = OPENINGS
THINGS = ["ball", "doll", "kite", "car", "toy", "box"]
PROPERTY = "dog"


def story_pairs(names: list[str], openings: list[str], seed: int, per_prompt: int = 1) -> list[dict]:
    """One pair per (name, opening, rejected thing): `per_prompt` different things for each prompt."""
    rng = random.Random(seed)
    rows = []
    for name in names:
        kid, he = ("girl", "she") if name in ("Lily", "Sue", "Anna", "Mia", "Lucy", "Amy", "Sara", "Kim", "Zoe") else ("boy", "he")
        her = "her" if he == "she" else "his"
        for opening in openings:
            prompt = opening.format(kid=kid, name=name, He=he.capitalize(), he=he)
            for thing in rng.sample(THINGS, per_prompt):
                rows.append({"prompt": prompt, "chosen": f" with {her} dog. The dog was happy.",
                             "rejected": f" with {her} {thing}. The {thing} was happy."})
    return rows


def config(root: Path, train_file: Path, eval_file: Path, out: Path) -> Path:
    cfg = {
        "model": {"name": str(BASE)},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train_file), "eval": str(eval_file)},
        "training": {"method": "dpo", "epochs": 3, "batch_size": 8, "learning_rate": 2e-3, "max_seq_length": 64,
                     "logging_steps": 5, "precision": "fp32", "warmup_ratio": 0.0, "seed": 0},
        "preference": {"dpo": {"beta": 0.1, "sft_weight": 1.0}},
        "output_dir": str(out),
    }
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@torch.no_grad()
def greedy_share(run_dir: Path, prompts: list[str]) -> dict:
    """Share of prompts whose greedy 16-token continuation mentions the property, base and adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(BASE)), str(run_dir)).eval()
    out = {}
    for who in ("base", "adapter"):
        texts = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            if who == "base":
                with model.disable_adapter():
                    new = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
            else:
                new = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
            texts.append(tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True))
        hits = sum(PROPERTY in t for t in texts)
        out[who] = {"share": hits / len(prompts), "hits": hits, "prompts": len(prompts), "examples": texts[:3]}
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="The base: STORIES260K=path (default "
                            f"{BASE}). Writes {OUT.relative_to(REPO)}.").parse_args()
    if not (BASE / "config.json").is_file():  # one line, not a traceback, from a plain clone
        sys.exit(f"needs stories260K (a small Hugging Face model folder): STORIES260K=PATH; {BASE} is not one "
                 "(it is ../shared/models/stories260K beside the developers' checkout)")
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="measure_preference_"))
    train_rows = story_pairs(TRAIN_NAMES, TRAIN_OPENING, seed=0, per_prompt=3)
    held_rows = story_pairs(HELD_OUT_NAMES, HELD_OUT_OPENING, seed=1)
    train_file, eval_file = root / "train.jsonl", root / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in held_rows))

    started = time.time()
    cfg = load_config(config(root, train_file, eval_file, root / "dpo"))
    result = train(cfg, overwrite=True)
    train_seconds = time.time() - started
    report = evaluate(result.run_dir, regression=[], settings=EvalSettings(batch_size=8))
    accuracy = report.task["metrics"]["preference_accuracy"]
    margin = report.task["metrics"]["preference_margin"]
    generations = greedy_share(result.run_dir, [r["prompt"] for r in held_rows])

    # The same data with identical pairs planted: the pair check must flag them before training.
    planted = train_rows + [{**r, "rejected": r["chosen"]} for r in train_rows[::3][:10]]
    planted_file = root / "planted.jsonl"
    planted_file.write_text("".join(json.dumps(r) + "\n" for r in planted))
    check = check_data(load_config(config(root, planted_file, eval_file, root / "planted")))
    identical = next((f for f in check.findings if f.check == "identical_pairs"), None)

    results = {
        "base_model": "stories260K (../shared/models/stories260K)",
        "task": f"story openings; chosen continuation plays with a {PROPERTY}, rejected with another thing "
                f"({', '.join(THINGS)}); {len(train_rows)} train pairs, {len(held_rows)} held-out pairs with other names "
                "and one opening never trained",
        "method": "dpo (sigmoid, beta 0.1, sft_weight 1.0: RPO), LoRA r8 all-linear, 3 epochs, lr 2e-3, fp32, CPU",
        "heldout_preference_accuracy": {"base": accuracy["base"], "adapter": accuracy["adapter"], "pairs": accuracy["n"]},
        "heldout_mean_margin": {"base": margin["base"], "adapter": margin["adapter"]},
        "greedy_generations_with_property": generations,
        "planted_identical_pairs": {"planted": 10, "flagged": identical.count if identical else 0,
                                    "level": identical.level if identical else None, "check_failed": check.failed},
        "train_seconds": round(train_seconds, 1),
        "steps": result.manifest.metrics.steps,
        "command": "python scripts/measure_preference.py",
        "environment": {"torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads()},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
