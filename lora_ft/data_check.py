"""Data check stage: find what is wrong with the train and eval rows before any GPU time is spent.

Reads the data exactly as training will (data/rows.py parses, formats, renders and masks; nothing is
re-implemented here) and reports, per split: malformed rows with file and line, token lengths after
the chat template, truncation and rows with nothing to learn, exact and near-duplicates, one prompt
with several answers, eval rows that leak from train, and a dominant answer in short-answer tasks.
`data.checks` sets each check to warn, fail or off. LoRA learns bad data as efficiently as good
data; the pitfall guarded here is a run that "works" on duplicated, contradictory or leaked rows.
Memory grows linearly with the rows: near-duplicates come from MinHash + LSH banding (data/near_dup.py),
never from comparing all pairs.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
from rich.markup import escape
from rich.progress import Progress

from lora_ft.config import DataSpec, RunConfig
from lora_ft.data.chat_template import check_end_of_turn
from lora_ft.data.prepared import PreparedData, PreparedSplit, prepare_data, truncate
from lora_ft.data.rows import IGNORE, Example, Row, ignored_fields, message_text
from lora_ft.errors import ConfigError, DataError
from lora_ft.data.near_dup import ShingleIndex
from lora_ft.data.pair_checks import check_pairs
from lora_ft.data.check_report import (
    SHOWN, SNIPPET, DataCheckResult, Finding, FixPlan, HeldoutOverlap, SplitReport, normalise,
)

# A "short-answer task" (classification-like) is one where answers are labels: nearly all of them a
# few words, and each distinct answer repeated. Only there is "one answer dominates" meaningful.
SHORT_ANSWER_WORDS = 3
SHORT_ANSWER_SHARE = 0.9
SHORT_ANSWER_MAX_LABELS = 50



# ---------------------------------------------------------------------------------------------
# The stage


def check_data(cfg: RunConfig, tokenizer=None, *, console=None, prepared: PreparedData | None = None) -> DataCheckResult:
    """Run every check that data.checks does not turn off, on the rows as training sees them: the prepared
    data (data/prepared.py) when the caller has it, else read and prepared here."""
    if cfg.data is None:
        raise ConfigError("data: missing; add data.train: path/to/train.jsonl")
    spec, levels = cfg.data, cfg.data.checks.model_dump()
    if tokenizer is None and prepared is None:
        from lora_ft.model.loading import load_tokenizer, resolve_model_source  # lazy: torch + transformers, ~2.6 s; preflight imports this module and refuses a typo or a finished run in 0.6 s

        tokenizer = load_tokenizer(cfg.model, resolve_model_source(cfg.model))
    started = time.perf_counter()  # the check's own time; loading a tokenizer is not the data's cost
    if cfg.training.method != "sft":
        return _preference_check(cfg, tokenizer, levels, started)
    prepared = prepared or prepare_data(spec, tokenizer, cfg.training.seed)
    tokenizer, fmt = prepared.conversation.tokenizer, prepared.format
    splits = [_read_split(split, spec) for split in prepared.splits]

    findings: list[Finding] = []
    add = _collector(findings, levels)
    reports = []
    for split in splits:
        tokens = _render_checks(split, tokenizer, spec.train_on, cfg.training.max_seq_length, add, console, levels)
        add("row_schema", "malformed_rows", split.name, [_error_item(e) for e in split.errors],
            f"rows do not fit the {fmt} format or its chat template")
        if levels["duplicates"] != "off":
            _duplicate_checks(split, cfg.data.checks.near_duplicate_threshold, add)
        answers = _answer_distribution(split) if fmt != "text" else None
        if levels["balance"] != "off" and answers:
            _balance_check(split, answers, cfg.data.checks.balance_max_share, add)
        reports.append(SplitReport(split.name, len(split.rows), len(split.errors), tokens, answers))
    end_of_turn = None
    if levels["end_of_turn"] != "off" and fmt != "text" and getattr(tokenizer, "chat_template", None):
        end_of_turn = _end_of_turn_check(splits[0], tokenizer, spec.train_on, cfg.training.max_seq_length, add)
    overlap = None
    if len(splits) == 2 and (levels["leakage"] != "off" or levels["near_leakage"] != "off"):
        overlap = _leakage_checks(splits[0], splits[1], cfg.data.checks.near_duplicate_threshold, levels, add)
    contradictions = _contradiction_checks(splits, add) if levels["contradictions"] != "off" and fmt != "text" else []

    for split in splits:
        split.release()  # the result keeps rows and verdicts for --fix, not the comparison texts and index
    plan = FixPlan(splits, contradictions)
    return DataCheckResult(
        fmt, cfg.training.max_seq_length, cfg.data.checks.near_duplicate_threshold, tuple(reports), tuple(findings),
        time.perf_counter() - started, plan, overlap, end_of_turn,
    )


def _preference_check(cfg: RunConfig, tokenizer, levels: dict, started: float) -> DataCheckResult:
    """Preference rows: the pair checks (data/pair_checks.py) reported like the others; --fix drops flagged pairs."""
    findings: list[Finding] = []
    out = check_pairs(cfg, tokenizer, _collector(findings, levels))
    reports, splits = [], []
    for split in out.splits:
        reports.append(SplitReport(split.name, len(split.rows), len(split.errors), out.tokens[split.name], None))
        index = {row.where: i for i, row in enumerate(split.rows)}
        examples = [pair.chosen.example for pair in split.pairs]
        splits.append(_Split(split.name, cfg.data.system_prompt, split.rows, examples, [index[p.where] for p in split.pairs],
                             list(split.errors), [], [], [], [], removed=out.removed[split.name]))
    overlap = None
    if len(out.splits) == 2:
        overlap = HeldoutOverlap(len(out.splits[1].pairs), out.leaked, None, cfg.data.checks.near_duplicate_threshold)
    return DataCheckResult(out.format, cfg.training.max_seq_length, cfg.data.checks.near_duplicate_threshold,
                           tuple(reports), tuple(findings), time.perf_counter() - started, FixPlan(splits, []), overlap)


def gate_data(cfg: RunConfig, tokenizer, console) -> DataCheckResult:
    """The checks at the start of `loraft train`: warnings print, a failing check stops the run (exit 2)."""
    return enforce_data_check(check_data(cfg, tokenizer, console=console), console)


def enforce_data_check(result: DataCheckResult, console) -> DataCheckResult:
    """Print each warning once; raise DataError (exit 2) when a check at fail fired."""
    for f in result.findings:
        if f.level == "warn":
            console.print(f"[yellow]warning[/]: data check {f.check} ({f.split}): {_escape(f.message)}")
    if result.failed:
        raise DataError(result.failure_line())
    return result


def _error_item(message: str) -> dict:
    where, _, error = message.partition(": ")
    return {"where": where, "error": error}


def _escape(text: str) -> str:
    return escape(text)


def _collector(findings: list[Finding], levels: dict):
    def add(check: str, name: str, split: str, items: list[dict], what: str, count: int | None = None) -> None:
        count = len(items) if count is None else count
        if levels[check] == "off" or count == 0:
            return
        findings.append(Finding(check, name, split, count, levels[check], f"{count} {what}", tuple(items[:SHOWN])))

    return add


# ---------------------------------------------------------------------------------------------
# Reading: one split's rows, examples and comparable texts


@dataclass
class _Split:
    name: str
    system_prompt: str | None
    rows: list[Row]
    examples: list[Example]  # the rows that parse; row_of[i] is the index in rows
    row_of: list[int]
    errors: list[str]
    texts: list[str]  # normalised whole row
    prompts: list[str | None]  # normalised prompt (None for text rows)
    answers: list[str | None]  # normalised final answer
    raw_answers: list[str | None]
    removed: dict[int, str] = field(default_factory=dict)  # example index -> why --fix drops it
    _index: ShingleIndex | None = None
    prepared: PreparedSplit | None = None  # the rows' encodings (SFT rows; preference pairs are encoded by data/pairs.py)

    def index(self, threshold: float) -> ShingleIndex:
        """MinHash index of the normalised rows, built once and shared by the duplicate and leakage checks."""
        if self._index is None:
            self._index = ShingleIndex(self.texts, threshold)
        return self._index

    def release(self) -> None:
        self.texts, self.prompts, self.answers, self.raw_answers, self._index = [], [], [], [], None

    def where(self, i: int) -> str:
        return self.examples[i].where

    def snippet(self, i: int) -> str:
        """The row as written (not normalised), shortened, on one line."""
        return _snip(_parts(self.examples[i], self.system_prompt)[2].replace("\n", "\\n"))


def _snip(text: str) -> str:
    return text if len(text) <= SNIPPET else text[: SNIPPET - 3] + "..."


def _read_split(prepared: PreparedSplit, spec: DataSpec) -> _Split:
    split = _Split(prepared.name, spec.system_prompt, list(prepared.rows), list(prepared.examples),
                   list(prepared.row_of), [str(e) for e in prepared.format_errors], [], [], [], [], prepared=prepared)
    for example in split.examples:
        prompt, answer, whole = _parts(example, spec.system_prompt)
        if prompt is None:
            split.texts.append(normalise(whole))
            split.prompts.append(None)
            split.answers.append(None)
        else:
            prompt, normal_answer = normalise(prompt), normalise(answer)
            split.prompts.append(prompt)
            split.answers.append(normal_answer)
            # prompt + answer is the whole row unless turns follow the last answer (normalising is the slow part)
            ends_with_answer = whole.endswith(answer)
            split.texts.append(" ".join(filter(None, (prompt, normal_answer))) if ends_with_answer else normalise(whole))
        split.raw_answers.append(answer)
    return split


def _parts(example: Example, system_prompt: str | None) -> tuple[str | None, str | None, str]:
    """(prompt, final answer, whole row) as plain text; the configured system prompt is the same
    for every row, so it is left out of what makes rows alike."""
    if example.text is not None:
        return None, None, example.text
    messages = [m for m in example.messages if not (m["role"] == "system" and m["content"] == system_prompt)]
    last = max(i for i, m in enumerate(messages) if m["role"] in ("assistant", "completion"))
    # A row's tool definitions are left out too: usually one long list shared by every row, they would make
    # all rows look alike. Tool calls and other message fields count (message_text).
    texts = [message_text(m) for m in messages]
    return "\n".join(texts[:last]), texts[last], "\n".join(texts)


# ---------------------------------------------------------------------------------------------
# Tokens


def _render_checks(split: _Split, tokenizer, train_on: str, max_len: int, add, console, levels: dict) -> dict | None:
    """Token lengths (the lengths check) from the prepared encodings, and the fields the chat template does not
    render (chat_fields). Returns the length statistics, None when lengths is off."""
    lengths_on, fields_on = levels["lengths"] != "off", levels["chat_fields"] != "off"
    n = len(split.examples)
    full = np.zeros(n, dtype=np.int64)
    before = np.zeros(n, dtype=np.int64)
    after = np.zeros(n, dtype=np.int64)
    ok = np.ones(n, dtype=bool)
    ignored: dict[int, list[str]] = {}
    with _progress(console, f"tokenizing {split.name}", n) as advance:
        encodings = split.prepared.encode_all()
        advance(n)
    for i, item in enumerate(encodings):
        if isinstance(item, DataError):  # e.g. the chat template fails on this row
            split.errors.append(str(item))
            split.removed[i] = "malformed"
            ok[i] = False
            continue
        full[i], before[i] = item.full_length, item.trained_before_truncation
        after[i] = sum(1 for label in item.labels[:max_len] if label != IGNORE)
        if fields_on and (found := ignored_fields(split.examples[i], tokenizer)):
            ignored[i] = found
    if fields_on:
        _ignored_fields_finding(split, ignored, add)
    if not lengths_on or not ok.any():
        return None
    lengths = full[ok]

    def where(indices) -> list[dict]:
        return [{"where": split.where(int(i)), "tokens": int(full[i]), "text": split.snippet(int(i))} for i in indices]

    long = np.flatnonzero(ok & (full > max_len))
    cut_all = np.flatnonzero(ok & (full > max_len) & (before > 0) & (after == 0))
    cut_part = np.flatnonzero(ok & (full > max_len) & (after > 0) & (after < before))
    longest_first = long[np.argsort(-full[long], kind="stable")]
    add("lengths", "too_long", split.name, where(longest_first),
        f"rows longer than max_seq_length {max_len} are truncated (completion cut away entirely in {len(cut_all)}, "
        f"partly in {len(cut_part)}, intact in {len(long) - len(cut_all) - len(cut_part)})")
    empty = [i for i, a in enumerate(split.raw_answers) if a is not None and not a.strip()]
    add("lengths", "empty_completion", split.name, where(empty), "rows have an empty completion (the model learns to answer nothing)")
    add("lengths", "no_trained_tokens", split.name, where(np.flatnonzero(ok & (after == 0))),
        "rows have every label masked after masking and truncation (zero loss; training drops them)")
    return {
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "total": int(lengths.sum()),
        "trained": int(after[ok].sum()),  # tokens in the loss after truncation (training.advice compares rank with it)
    }


def _ignored_fields_finding(split: _Split, ignored: dict[int, list[str]], add) -> None:
    """One finding per split: which fields the template never renders, how often, and where first."""
    if not ignored:
        return
    counts = Counter(name for names in ignored.values() for name in names)
    what = ", ".join(f"{name} ({n}x)" for name, n in counts.most_common())
    items = [{"where": split.where(i), "fields": ", ".join(sorted(set(names)))} for i, names in sorted(ignored.items())]
    add("chat_fields", "ignored_by_template", split.name, items,
        f"rows have fields the chat template does not render, so the model never sees them: {what}; "
        "use a template that renders them (model.chat_template) or drop them from the data")


class _progress:
    """A rich progress bar when a console is given; `advance(k)` is cheap either way."""

    def __init__(self, console, label: str, total: int):
        self.console, self.label, self.total, self.bar = console, label, total, None

    def __enter__(self):
        if self.console is None or self.total < 5000:
            return lambda k: None

        self.bar = Progress(console=self.console, transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda k: self.bar.advance(task, k)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------------
# Duplicates, contradictions, balance, leakage


def _duplicate_checks(split: _Split, threshold: float, add) -> None:
    first: dict[str, int] = {}
    exact = []
    for i, text in enumerate(split.texts):
        kept = first.setdefault(text, i)
        if kept != i:
            split.removed[i] = f"exact duplicate of {split.where(kept)}"
            exact.append({"where": split.where(i), "same_as": split.where(kept), "text": split.snippet(i)})
    add("duplicates", "exact_duplicates", split.name, exact, "rows repeat an earlier row exactly (after normalising)")

    unique = sorted(first.values())  # near-duplicates among distinct rows only
    near = []
    for i, j, similarity in split.index(threshold).duplicates(np.asarray(unique, dtype=np.int64)):
        split.removed[i] = f"near duplicate of {split.where(j)} (Jaccard {similarity:.2f})"
        near.append({"where": split.where(i), "like": split.where(j), "jaccard": round(similarity, 3), "text": split.snippet(i)})
    near.sort(key=lambda item: item["jaccard"], reverse=True)
    add("duplicates", "near_duplicates", split.name, near, f"rows are near-duplicates of another row (Jaccard >= {threshold})")


def _contradiction_checks(splits: list[_Split], add) -> list[dict]:
    """Prompts with more than one answer, within a split and across train and eval (an eval row that
    contradicts train penalises the model for learning train's answer). Groups are reported under the
    splits they involve."""
    by_prompt: dict[str, dict[str, list[tuple[_Split, int]]]] = defaultdict(lambda: defaultdict(list))
    for split in splits:
        for i, (prompt, answer) in enumerate(zip(split.prompts, split.answers)):
            by_prompt[prompt][answer].append((split, i))
    groups: dict[str, list[dict]] = defaultdict(list)
    for prompt, answers in by_prompt.items():
        if len(answers) < 2:
            continue
        involved = "+".join(s.name for s in splits if any(owner is s for rows in answers.values() for owner, _ in rows))
        groups[involved].append({
            "split": involved,
            "prompt": prompt,
            "answers": [
                {"answer": rows[0][0].raw_answers[rows[0][1]], "rows": [owner.where(i) for owner, i in rows]}
                for rows in answers.values()
            ],
        })
    for involved, found in groups.items():
        shown = [
            {"prompt": _snip(g["prompt"]), "answers": " | ".join(_snip(a["answer"]) + f" ({len(a['rows'])})" for a in g["answers"]),
             "where": g["answers"][0]["rows"][0]}
            for g in found
        ]
        rows = sum(len(a["rows"]) for g in found for a in g["answers"])
        add("contradictions", "conflicting_answers", involved, shown,
            f"prompts have different answers ({rows} rows involved)", count=len(shown))
    return [group for found in groups.values() for group in found]


def _answer_distribution(split: _Split) -> dict | None:
    answers = [a for a in split.answers if a is not None]
    if not answers:
        return None
    counts = Counter(answers)
    short = sum(1 for a in answers if len(a.split()) <= SHORT_ANSWER_WORDS) / len(answers)
    labels_repeat = len(counts) <= min(SHORT_ANSWER_MAX_LABELS, len(answers) / 3)
    if short < SHORT_ANSWER_SHARE or not labels_repeat:
        return None
    return dict(counts.most_common())


def _balance_check(split: _Split, answers: dict, max_share: float, add) -> None:
    top, count = next(iter(answers.items()))
    share = count / sum(answers.values())
    if share <= max_share:
        return
    example = {"answer": top, "rows": count, "share": round(share, 3)}
    add("balance", "dominant_answer", split.name, [example],
        f"answer {top!r} is {share:.0%} of {sum(answers.values())} rows (more than {max_share:.0%}): "
        "always answering it would score that well", count=1)


def _end_of_turn_check(split: _Split, tokenizer, train_on: str, max_len: int, add):
    """The one end-of-turn rule (chat_template.check_end_of_turn) on every train row as training cuts it,
    reported with the other findings at data.checks.end_of_turn's level; train enforces nothing besides."""
    encoded = [truncate(item, max_len) for item in split.prepared.encode_all() if not isinstance(item, DataError)]
    report = check_end_of_turn(encoded, tokenizer, train_on)
    if report.token is None and report.turns:
        add("end_of_turn", "no_end_of_turn_token", split.name, [{"where": "chat template"}],
            "assistant turns get no end-of-turn token from the chat template: a trained model cannot "
            "learn to stop; set model.chat_template", count=report.turns)
    elif report.missing:
        add("end_of_turn", "end_of_turn_not_trained", split.name, [{"where": report.example}],
            f"of {report.turns} assistant turns do not end with a trained {report.token}: the model would "
            "not learn to stop (see it with loraft data show)", count=report.missing)
    return report


def _leakage_checks(train: _Split, evaluation: _Split, threshold: float, levels: dict, add) -> HeldoutOverlap:
    """Eval rows also in train. Exact copies (after normalising) are `leakage` and fail by default: the
    held-out loss on them is train loss. Near copies are `near_leakage` and warn by default: Jaccard on word
    bigrams cannot tell a copied row from a new row built from the same template, so each one is listed
    beside the most similar train row found, for a person to judge."""
    in_train: dict[str, int] = {}
    for i, text in enumerate(train.texts):
        in_train.setdefault(text, i)
    exact, rest = [], []
    for i, text in enumerate(evaluation.texts):
        if text in in_train:
            j = in_train[text]
            exact.append({"where": evaluation.where(i), "in_train": train.where(j), "jaccard": 1.0, "text": evaluation.snippet(i)})
            if levels["leakage"] != "off":
                evaluation.removed[i] = f"also in train at {train.where(j)}"
        else:
            rest.append(i)
    near = []
    if levels["near_leakage"] != "off":
        train_unique = np.asarray(sorted(in_train.values()), dtype=np.int64)
        matches = evaluation.index(threshold).matches(np.asarray(rest, dtype=np.int64), train.index(threshold), train_unique)
        for i, (j, similarity) in sorted(matches.items()):
            near.append({"where": evaluation.where(i), "in_train": train.where(j), "jaccard": round(similarity, 3),
                         "text": evaluation.snippet(i), "train_text": train.snippet(j)})
            evaluation.removed[i] = f"nearly in train at {train.where(j)} (Jaccard {similarity:.2f})"
        near.sort(key=lambda item: item["jaccard"], reverse=True)
    add("leakage", "eval_rows_in_train", "train+eval", exact, "eval rows also appear in train (exactly, after normalising)")
    add("near_leakage", "eval_rows_near_train", "train+eval", near,
        f"eval rows are near copies of a train row (Jaccard >= {threshold:g} on word bigrams; rows from one template "
        "can be this close without being copies: judge from the pairs)")
    pairs = [{**item, "train_text": item.get("train_text", item["text"])} for item in exact] + near
    return HeldoutOverlap(len(evaluation.texts), len(exact), len(near) if levels["near_leakage"] != "off" else None,
                          threshold, tuple(pairs))
