"""Does the advice help? A full fine-tuning learning rate (2e-5) against the one the advice suggests, same steps,
on the quickstart task and on a stories260K task; and a rank too small for the supervised tokens, against what
`loraft inspect` says after training.

For each task: the pre-flight advice of the flagged config (what `loraft validate` prints), then two short runs that
differ only in training.learning_rate (2e-5, then the advice's suggestion), each scored on the held-out split. On
stories260K also: rank 2 (flagged: fewer LoRA parameters than supervised tokens) and the suggested rank, with the
inspect verdict and the after-run advice of each.

    python scripts/measure_advice.py                 # -> scripts/results/advice.json (~25 min on one busy core)
"""

from __future__ import annotations

import argparse
import io
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

FULL_FT_LR = 2e-5
NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Tim", "Sara", "Mia", "Sam"]
COLORS = ["red", "blue", "green", "yellow", "pink", "brown", "white", "black"]
THINGS = ["ball", "car", "hat", "dog", "cat", "box", "kite", "bird", "cup", "bed"]


def story_rows(seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """A templated story: held-out rows are name/colour/thing combinations not seen in train."""
    combos = list(itertools.product(NAMES, COLORS, THINGS))
    random.Random(seed).shuffle(combos)

    def row(name, color, thing):
        return {"prompt": f"Write a story about {name} and a {color} {thing}.",
                "completion": f" {name} had a {color} {thing}. {name} loved the {color} {thing} very much. One day the "
                              f"{thing} was lost. {name} was sad and looked for the {thing} everywhere. At last {name} "
                              f"found the {color} {thing} under the bed and smiled."}

    return [row(*c) for c in combos[:n_train]], [row(*c) for c in combos[n_train : n_train + n_eval]]


def quiet():
    from rich.console import Console

    return Console(file=io.StringIO())


def finding(advice, name: str) -> dict | None:
    return next((f.model_dump(mode="json") for f in advice.findings if f.name == name), None)


def run(cfg, label: str) -> dict:
    from lora_ft.rank_diagnostics import inspect_adapter
    from lora_ft.train import train

    started = time.time()
    result = train(cfg, console=quiet())
    m = result.manifest
    verdict = inspect_adapter(result.run_dir, console=quiet())
    out = {
        "label": label,
        "learning_rate": cfg.training.learning_rate,
        "rank": cfg.lora.rank,
        "steps": m.metrics.steps,
        "train_loss": m.metrics.train_loss,
        "heldout_base": m.metrics.heldout["base"].loss,
        "heldout_adapter": m.metrics.heldout["adapter"].loss,
        "mean_relative_update": verdict.mean_relative_norm,
        "inspect_verdict": verdict.verdict,
        "median_rank_used": verdict.median_rank_used,
        "advice_after_inspect": [f.line() for f in verdict.advice],
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(out), flush=True)
    return out


def lr_pair(cfg, steps: int) -> dict:
    """The flagged config's advice, then the flagged and the suggested learning rate for the same steps."""
    from lora_ft.train import preflight

    flagged = cfg.model_copy(update={"training": cfg.training.model_copy(update={"learning_rate": FULL_FT_LR, "max_steps": steps})})
    advice = preflight(flagged).advice
    lr = finding(advice, "learning_rate")
    suggested = flagged.model_copy(update={"training": flagged.training.model_copy(update={"learning_rate": lr["suggested"]})})
    out_dir = Path(cfg.output_dir)
    runs = [run(flagged.model_copy(update={"output_dir": str(out_dir / "flagged")}), f"lr {FULL_FT_LR:g} (flagged)"),
            run(suggested.model_copy(update={"output_dir": str(out_dir / "suggested")}), f"lr {lr['suggested']:g} (suggested)")]
    return {"advice_before": lr, "runs": runs,
            "suggested_lower_heldout": runs[1]["heldout_adapter"] < runs[0]["heldout_adapter"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "scripts" / "results" / "advice.json"))
    parser.add_argument("--stories", default=str(ROOT.parent / "shared" / "models" / "stories260K"))
    parser.add_argument("--quickstart-steps", type=int, default=20)
    parser.add_argument("--stories-steps", type=int, default=40)
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not (Path(args.stories) / "config.json").is_file():  # one line, not a traceback, from a plain clone
        sys.exit(f"needs stories260K (a small Hugging Face model folder): --stories PATH; {args.stories} is not one "
                 "(it is ../shared/models/stories260K beside the developers' checkout)")

    import torch

    from lora_ft.config_io import load_config, validate_dict
    from lora_ft.train import preflight

    torch.set_num_threads(args.threads)  # on a shared 2-core machine one thread each avoids spinning against the others

    results = {"command": "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    with tempfile.TemporaryDirectory(prefix="advice-") as work:
        work = Path(work)
        if not args.skip_quickstart:
            quick = load_config(ROOT / "recipes" / "quickstart.yaml", [f"output_dir={work / 'quickstart'}"])
            quick = quick.model_copy(update={"data": quick.data.model_copy(update={
                "train": quick.data.train.model_copy(update={"path": str(ROOT / quick.data.train.path)}),
                "eval": quick.data.eval.model_copy(update={"path": str(ROOT / quick.data.eval.path)})})})
            results["quickstart"] = lr_pair(quick, args.quickstart_steps)

        train_rows, eval_rows = story_rows(0, 600, 100)
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        raw = {
            "model": {"name": args.stories},
            "lora": {"rank": 8, "alpha": 32, "dropout": 0.0},
            # Templated rows are near one another by construction; leakage here means exact copies only.
            "data": {"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl"),
                     "checks": {"leakage": "warn", "duplicates": "off", "near_leakage": "off"}},
            "training": {"epochs": 1, "batch_size": 16, "max_seq_length": 160, "precision": "fp32", "seed": 0,
                         "logging_steps": 5, "gradient_checkpointing": False, "warmup_ratio": 0.0},
            "output_dir": str(work / "stories"),
        }
        stories = validate_dict(raw)
        results["stories260K"] = lr_pair(stories, args.stories_steps)

        # Capacity: rank 2 has fewer LoRA parameters than the supervised tokens; the suggested rank has enough.
        # alpha 32 for both (LWR's fixed alpha: the learning rate carries across ranks). Two epochs at the suggested rate so the update has room to fill its directions.
        small = validate_dict({**raw, "lora": {**raw["lora"], "rank": 2},
                               "training": {**raw["training"], "epochs": 2,
                                            "learning_rate": results["stories260K"]["advice_before"]["suggested"]},
                               "output_dir": str(work / "rank-small")})
        rank = finding(preflight(small).advice, "rank")
        big = validate_dict({**raw, "lora": {**raw["lora"], "rank": rank["suggested"]},
                             "training": small.training.model_dump(), "output_dir": str(work / "rank-suggested")})
        results["capacity"] = {"advice_before": rank, "runs": [run(small, "rank 2 (flagged)"),
                                                               run(big, f"rank {rank['suggested']} (suggested)")]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
