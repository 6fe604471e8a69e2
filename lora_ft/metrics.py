"""Metrics: generated answers against references (pure functions, no model), and the loss of encoded rows under a
model, the one computation behind train's held-out figures and eval's (so the two cannot drift apart).

Generation metrics: a generated answer and a reference in, a score in [0, 1] out.

Normalisation is deliberately light and stated per metric, so a score can be checked by hand:
exact match ignores surrounding whitespace only; contains is case-insensitive; ROUGE-L lowercases and
splits on whitespace. "stops" is not computed here: it is whether generation ended on a stop id.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext
from typing import Sequence

from lora_ft.errors import LoraftError

# The eval gate's default: the largest mean per-example loss increase (nats/token) on the regression set. Here, not
# in evaluate.py, so the CLI can show it in --help without importing torch (a config typo refuses in under a second).
DEFAULT_MAX_REGRESSION = 0.25
GENERATION_METRICS = ("exact_match", "contains", "regex", "json_valid", "json_fields", "rouge_l", "stops")


def exact_match(output: str, reference: str) -> float:
    """1.0 when the answer equals the reference, ignoring surrounding whitespace only."""
    return float(output.strip() == reference.strip())


def contains(output: str, reference: str) -> float:
    """1.0 when the reference appears in the answer, case-insensitively ("Paris" in "It is Paris.")."""
    return float(reference.strip().casefold() in output.casefold())


def regex_match(output: str, pattern: str) -> float:
    """1.0 when re.search finds the pattern in the answer (anchor it with ^...$ for a full match)."""
    try:
        return float(re.search(pattern, output, flags=re.DOTALL) is not None)
    except re.error as exc:
        raise LoraftError(f"regex {pattern!r} is not a valid regular expression ({exc})") from None


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


def parse_json(text: str):
    """The JSON value of an answer, or None; one surrounding ```json fence is tolerated."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def json_valid(output: str) -> float:
    return float(parse_json(output) is not None)


def json_fields(output: str, reference: str) -> float:
    """Share of the reference object's fields the answer has with equal values (1/0 for non-objects)."""
    expected, got = parse_json(reference), parse_json(output)
    if isinstance(expected, dict):
        if not expected:
            return float(got == {})
        if not isinstance(got, dict):
            return 0.0
        return sum(1 for key, value in expected.items() if key in got and got[key] == value) / len(expected)
    return float(got is not None and got == expected)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, O(len(a)*len(b)) time and O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F1 over lowercased whitespace tokens (Lin 2004, beta=1)."""
    hyp, ref = output.lower().split(), reference.lower().split()
    if not hyp or not ref:
        return float(hyp == ref)
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_generation(output: str, stopped: bool, reference: str, regex: str | None = None, answer: str | None = None) -> dict[str, float]:
    """Every metric that applies to this row (JSON metrics only where the reference is JSON, regex where one is given).

    `answer` is a row's short key ("Paris") for `contains` when the reference is a whole sentence.
    """
    scores = {
        "exact_match": exact_match(output, reference),
        "contains": contains(output, answer or reference),
        "rouge_l": rouge_l(output, reference),
        "stops": float(stopped),
    }
    if regex:
        scores["regex"] = regex_match(output, regex)
    if isinstance(parse_json(reference), (dict, list)):
        scores["json_valid"] = json_valid(output)
        scores["json_fields"] = json_fields(output, reference)
    return scores


# ---------------------------------------------------------------------------------------------
# Loss over encoded rows: the one computation behind train's held-out figures and eval's


def example_losses(model, encoded, *, pad_token_id: int, batch_size: int = 8, disable_adapter: bool = False) -> list[tuple[float, int]]:
    """(summed NLL, trained tokens) of each encoded row, in order."""
    import torch  # lazy: ~1.3 s; the CLI imports this module at its top (--help, and train's 0.6 s refusals)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    context = model.disable_adapter() if disable_adapter else nullcontext()
    with context, torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            input_ids, labels, attention = _pad(batch, pad_token_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
            shift_labels = labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
            )
            sums, counts = nll.sum(dim=1), (shift_labels != -100).sum(dim=1)
            out += [(float(s), int(c)) for s, c in zip(sums.tolist(), counts.tolist())]
    if was_training:
        model.train()
    return out


def heldout_loss(model, encoded, *, pad_token_id: int, batch_size: int = 8, disable_adapter: bool = False) -> dict:
    """Token-weighted mean NLL and perplexity over encoded rows (input_ids + labels)."""
    per_row = example_losses(model, encoded, pad_token_id=pad_token_id, batch_size=batch_size, disable_adapter=disable_adapter)
    return loss_summary(per_row)


def loss_summary(per_row: list[tuple[float, int]]) -> dict:
    total_nll = sum(s for s, _ in per_row)
    total_tokens = sum(c for _, c in per_row)
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": total_tokens, "rows": len(per_row)}


def _pad(batch, pad_token_id: int):
    import torch  # lazy: as in example_losses

    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention[row, :n] = 1
    return input_ids, labels, attention
