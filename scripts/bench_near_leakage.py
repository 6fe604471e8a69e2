"""Precision of near-leakage detection on templated data: how many flagged eval rows are not copies.

The set is the issue's hard case: stories built from one template with different slot values. Train
holds 20,000 distinct combinations; eval holds 1,000 new combinations (none in train, so none is a copy)
and 100 planted copies (a train row with one non-slot word changed: what a copy looks like after light
editing). Ground truth is known by construction: a flagged planted row is a true copy, any other flagged
row is a new combination that only looks close. The check runs as `loraft data check` runs it (the
same config path, `check_data`), at the default threshold and a few stricter ones.

Writes scripts/results/near_leakage_templated.json.

Usage: python scripts/bench_near_leakage.py [--train 20000] [--eval 1000] [--copies 100]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
RESULT = ROOT / "scripts" / "results" / "near_leakage_templated.json"
THRESHOLDS = (0.8, 0.85, 0.9, 0.95)

SLOTS = {
    "name": ["Tom", "Lily", "Sam", "Mia", "Ben", "Zoe", "Max", "Ella", "Leo", "Ruby", "Jack", "Anna", "Finn", "Nora",
             "Theo", "Ivy", "Oscar", "Lucy", "Hugo", "Rose"],
    "animal": ["cat", "dog", "frog", "bird", "fox", "bear", "rabbit", "duck", "mouse", "owl", "pig", "goat", "horse",
               "turtle", "lion"],
    "place": ["forest", "garden", "castle", "river", "village", "beach", "meadow", "cave", "farm", "park", "lake", "hill"],
    "thing": ["ball", "key", "hat", "box", "kite", "shell", "map", "drum", "cup", "star", "book", "coin"],
    "feeling": ["happy", "proud", "surprised", "curious", "brave", "calm", "excited", "glad"],
}
PROMPT = "Write a short story for a child about {name} the {animal}, who finds a {thing} in the {place}."
STORY = (
    "Once upon a time there was a little {animal} named {name}. Every morning {name} walked to the {place} "
    "to play. One sunny day, {name} saw something shiny under a tree. It was a {thing}! {name} felt {feeling} "
    "and showed the {thing} to all the friends in the {place}. From that day on, {name} the {animal} "
    "kept the {thing} safe at home."
)
# Words of the template that are not slots: changing one is an edit of a copied row, not a new combination.
EDITS = [("little", "small"), ("morning", "evening"), ("shiny", "bright"), ("sunny", "windy"), ("tree", "bush"), ("safe", "close")]


def row(slots: dict) -> dict:
    return {"prompt": PROMPT.format(**slots), "completion": STORY.format(**slots)}


def make_data(folder: Path, n_train: int, n_eval: int, n_copies: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    names = list(SLOTS)
    combos = list(itertools.product(*SLOTS.values()))
    rng.shuffle(combos)
    if n_train + n_eval > len(combos):
        raise SystemExit(f"only {len(combos)} combinations")
    train = [row(dict(zip(names, c))) for c in combos[:n_train]]
    new = [row(dict(zip(names, c))) for c in combos[n_train : n_train + n_eval]]
    copies = []
    for k in range(n_copies):
        source = train[rng.randrange(n_train)]
        old, replacement = EDITS[k % len(EDITS)]
        copies.append({"prompt": source["prompt"], "completion": source["completion"].replace(old, replacement, 1)})
    evaluation = new + copies
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("train", train), ("eval", evaluation)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    # eval lines (1-based) that are copies
    return {"copies": set(range(n_eval + 1, n_eval + n_copies + 1)), "new": n_eval}


def measure(folder: Path, tokenizer, truth: dict, threshold: float) -> dict:
    from lora_ft.config_io import validate_dict
    from lora_ft.data_check import check_data

    cfg = validate_dict({
        "model": {"name": "unused"},
        "data": {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl"),
                 "checks": {"lengths": "off", "chat_fields": "off", "duplicates": "off", "contradictions": "off",
                            "near_duplicate_threshold": threshold}},
    })
    started = time.perf_counter()
    result = check_data(cfg, tokenizer)
    seconds = time.perf_counter() - started
    near = [p for p in result.overlap.pairs if p["jaccard"] < 1.0]
    flagged = {int(p["where"].rsplit(":", 1)[1]) for p in near}
    true_copies = len(flagged & truth["copies"])
    not_copies = len(flagged - truth["copies"])
    similarities = sorted(p["jaccard"] for p in near if int(p["where"].rsplit(":", 1)[1]) not in truth["copies"])
    return {
        "threshold": threshold,
        "flagged": len(flagged),
        "flagged_copies": true_copies,
        "flagged_not_copies": not_copies,
        "precision": round(true_copies / len(flagged), 4) if flagged else None,
        "recall_on_copies": round(true_copies / len(truth["copies"]), 4),
        "share_of_new_rows_flagged": round(not_copies / truth["new"], 4),
        "not_copies_jaccard_max": similarities[-1] if similarities else None,
        "exact_leakage": result.overlap.exact,
        "refused_by_default": result.failed,
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=20_000)
    parser.add_argument("--eval", type=int, default=1_000)
    parser.add_argument("--copies", type=int, default=100)
    args = parser.parse_args()
    from bench_data_check import tiny_tokenizer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        truth = make_data(tmp / "data", args.train, args.eval, args.copies)
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer(tmp / "tokenizer")))
        runs = [measure(tmp / "data", tokenizer, truth, t) for t in THRESHOLDS]
    command = "python scripts/bench_near_leakage.py"
    if (args.train, args.eval, args.copies) != (20_000, 1_000, 100):
        command += f" --train {args.train} --eval {args.eval} --copies {args.copies}"
    result = {
        "command": command,
        "what": "near-leakage flags on templated stories: eval = new slot combinations (not copies) + planted copies "
                "(a train row with one non-slot word changed)",
        "train_rows": args.train, "eval_new_combinations": args.eval, "eval_planted_copies": args.copies,
        "default_threshold": 0.8,
        "runs": runs,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
