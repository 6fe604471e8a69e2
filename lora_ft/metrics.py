"""Generation metrics: a generated answer and a reference in, a score in [0, 1] out (pure functions, no model).

Normalisation is deliberately light and stated per metric, so a score can be checked by hand:
exact match ignores surrounding whitespace only; contains is case-insensitive; ROUGE-L lowercases and
splits on whitespace. "stops" is not computed here: it is whether generation ended on a stop id.
"""

from __future__ import annotations

import json
import re
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
