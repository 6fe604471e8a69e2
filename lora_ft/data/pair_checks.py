"""Pair checks: what is wrong with preference data before any GPU time is spent.

Run by `loraft data check`, `validate` and `train` (through data_check's hook) on the pairs as training
encodes them (data/pairs.py). Each finding goes through data_check's collector, so it has a level from
data.checks (warn, fail, off), a count and rows with file:line:
- identical_pairs: chosen and rejected are the same text (fail: the loss is zero, the pair is noise);
- near_identical_pairs: they differ by little (difflib ratio >= near_identical_threshold), shown side by side;
- emptied_answers / cut_answers: the length limits leave nothing of an answer (fail; NaN with length-normalised
  losses) or cut it (warn, with the share);
- pair_prompts: chosen and rejected render from different prompts (a comparison of two different questions);
- length_bias: the share of pairs whose chosen answer is longer, and the mean length ratio;
- contradictions: the same prompt with A over B in one pair and B over A in another (KTO: the same completion
  labelled both desirable and undesirable);
- leakage: held-out pairs that also appear exactly in train.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from lora_ft.config import RunConfig
from lora_ft.data.pairs import PairSplit, detect_preference_format, encode_pair, read_split
from lora_ft.data.rows import load_rows
from lora_ft.errors import DataError

SNIPPET = 80
PAIR_CHECKS = ("identical_pairs", "near_identical_pairs", "emptied_answers", "cut_answers", "pair_prompts", "length_bias")


@dataclass(frozen=True)
class PairCheckOutput:
    """What data_check turns into its result: the format, each split (rows, bad rows, token lengths), the overlap."""

    format: str
    splits: tuple[PairSplit, ...]
    tokens: dict  # split name -> {min, median, p95, max} of prompt + longest answer
    removed: dict  # split name -> {pair index: why --fix drops it}
    leaked: int  # eval pairs also in train


def check_pairs(cfg: RunConfig, tokenizer, add) -> PairCheckOutput:
    """Run every pair check; `add(check, name, split, items, what, count=None)` records a finding (data_check's)."""
    spec, checks = cfg.data, cfg.data.checks
    train_rows, eval_rows = load_rows(spec, cfg.training.seed)
    fmt = detect_preference_format(train_rows, spec)
    splits = [read_split("train", train_rows, spec, tokenizer, fmt, collect=True)]
    if eval_rows:
        splits.append(read_split("eval", eval_rows, spec, tokenizer, fmt, collect=True))
    tokens, removed = {}, {}
    for split in splits:
        removed[split.name] = {}
        add("row_schema", "malformed_rows", split.name, [_error_item(e) for e in split.errors],
            f"rows do not fit the {fmt} preference format")
        encoded = []
        for pair in split.pairs:
            try:
                encoded.append(encode_pair(pair, tokenizer, max_seq_length=cfg.training.max_seq_length,
                                           max_prompt_length=cfg.preference.max_prompt_length))
            except DataError as exc:
                split.errors.append(str(exc))
                encoded.append(None)
        tokens[split.name] = _length_stats([e for e in encoded if e is not None])
        _answer_checks(split, encoded, checks.near_identical_threshold, add, removed[split.name])
        _length_checks(split, encoded, cfg.training.max_seq_length, add, removed[split.name])
        if fmt == "pairs":
            _length_bias(split, encoded, checks.length_bias_max_share, add)
    leaked = _leakage(splits, add, removed) if len(splits) == 2 else 0
    _contradictions(splits, fmt, add)
    return PairCheckOutput(fmt, tuple(splits), tokens, removed, leaked)


def _error_item(message: str) -> dict:
    where, _, error = message.partition(": ")
    return {"where": where, "error": error}


def _snip(text: str) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= SNIPPET else text[: SNIPPET - 3] + "..."


def similarity(a: str, b: str) -> float:
    """Character similarity of two answers (difflib's ratio: 1.0 identical, 0.0 nothing in common)."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _answer_checks(split: PairSplit, encoded, threshold: float, add, removed: dict) -> None:
    identical, near, prompts = [], [], []
    for i, (pair, item) in enumerate(zip(split.pairs, encoded)):
        if pair.rejected is None:
            continue
        chosen, rejected = pair.chosen.text.strip(), pair.rejected.text.strip()
        if chosen == rejected:
            identical.append({"where": pair.where, "answer": _snip(chosen)})
            removed[i] = "chosen and rejected are identical"
        else:
            ratio = similarity(chosen, rejected)
            if ratio >= threshold:
                near.append({"where": pair.where, "similarity": round(ratio, 3), "chosen": _snip(chosen),
                             "rejected": _snip(rejected)})
        if item is not None and not item.same_prompt:
            prompts.append({"where": pair.where, "prompt": _snip(pair.prompt_text)})
            removed[i] = "chosen and rejected render from different prompts"
    n = len(split.pairs)
    add("identical_pairs", "chosen_equals_rejected", split.name, identical,
        f"of {n} pairs have identical chosen and rejected answers (they teach nothing)")
    near.sort(key=lambda item: -item["similarity"])
    add("near_identical_pairs", "chosen_near_rejected", split.name, near,
        f"of {n} pairs have near-identical chosen and rejected answers (similarity >= {threshold:g})")
    add("pair_prompts", "different_prompts", split.name, prompts,
        f"of {n} pairs render chosen and rejected from different prompts (the prompt of chosen is trained for both)")


def _length_checks(split: PairSplit, encoded, max_len: int, add, removed: dict) -> None:
    emptied, cut = [], []
    for i, item in enumerate(encoded):
        if item is None:
            continue
        shown = {"where": item.where, "prompt": item.prompt_full,
                 **{side: f"{len(ids)}/{full}" for side, ids, full in item.answers}}
        if item.emptied:
            emptied.append(shown)
            removed[i] = "an answer is emptied by the length limits"
        elif item.cut:
            cut.append(shown)
    n = max(len(split.pairs), 1)
    add("emptied_answers", "answer_emptied", split.name, emptied,
        f"of {len(split.pairs)} pairs have an answer left with no token by max_seq_length {max_len} / "
        "preference.max_prompt_length (training drops them; length-normalised losses would be NaN)")
    add("cut_answers", "answer_cut", split.name, cut,
        f"of {len(split.pairs)} pairs ({len(cut) / n:.0%}) are cut by the length limits (tokens kept/full shown): "
        "the preference is judged on part of an answer")


def _length_bias(split: PairSplit, encoded, max_share: float, add) -> None:
    sizes = [(e.chosen_full, e.rejected_full) for e in encoded if e is not None and e.rejected_full is not None]
    if not sizes:
        return
    longer = sum(1 for c, r in sizes if c > r)
    share = longer / len(sizes)
    ratio = sum(c / max(r, 1) for c, r in sizes) / len(sizes)
    if share <= max_share:
        return
    add("length_bias", "chosen_longer", split.name,
        [{"where": split.name, "chosen_longer": longer, "pairs": len(sizes), "share": round(share, 3),
          "mean_length_ratio": round(ratio, 3)}],
        f"of {len(sizes)} pairs ({share:.0%}, more than {max_share:.0%}) have the chosen answer longer; mean length "
        f"ratio chosen/rejected {ratio:.2f}: the model can learn 'longer' rather than 'better'", count=longer)


def _key(pair) -> tuple:
    answers = (pair.chosen.text.strip(), pair.rejected.text.strip() if pair.rejected else None, pair.label)
    return (pair.chosen.prompt_key, *answers)


def _leakage(splits, add, removed: dict) -> int:
    train, evaluation = splits
    in_train = {}
    for pair in train.pairs:
        in_train.setdefault(_key(pair), pair.where)
    leaked = []
    for i, pair in enumerate(evaluation.pairs):
        if _key(pair) in in_train:
            leaked.append({"where": pair.where, "in_train": in_train[_key(pair)], "prompt": _snip(pair.prompt_text)})
            removed["eval"][i] = f"also in train at {in_train[_key(pair)]}"
    add("leakage", "eval_pairs_in_train", "train+eval", leaked,
        f"of {len(evaluation.pairs)} held-out pairs also appear exactly in train (the held-out preference accuracy "
        "on them measures memory)")
    return len(leaked)


def _contradictions(splits, fmt: str, add) -> None:
    """Pairs: (A over B) and (B over A) for one prompt. KTO: one prompt and completion labelled both ways."""
    seen: dict[tuple, list[tuple[str, str]]] = defaultdict(list)
    for split in splits:
        for pair in split.pairs:
            if fmt == "pairs":
                a, b = pair.chosen.text.strip(), pair.rejected.text.strip()
                if a == b:
                    continue
                seen[(pair.chosen.prompt_key, *sorted((a, b)))].append((pair.where, a))
            else:
                seen[(pair.chosen.prompt_key, pair.chosen.text.strip())].append((pair.where, str(pair.label)))
    found = []
    for key, entries in seen.items():
        if len({winner for _, winner in entries}) > 1:
            found.append({"where": entries[0][0], "against": entries[1][0] if len(entries) > 1 else "",
                          "rows": len(entries), "prompt": _snip(key[0])})
    what = ("prompts have pairs that prefer A over B and B over A" if fmt == "pairs"
            else "prompt+completion rows are labelled both desirable and undesirable")
    add("contradictions", "contradictory_preferences", "+".join(s.name for s in splits), found, what)


def _length_stats(encoded) -> dict | None:
    lengths = np.asarray([len(e.prompt_ids) + max(len(ids) for _, ids, _ in e.answers) for e in encoded])
    if not lengths.size:
        return None
    return {"min": int(lengths.min()), "median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()), "total": int(lengths.sum())}
