"""Prepared data: one command's rows read, validated, rendered and tokenized once.

`prepare_data` reads each file once (the sha256 the manifest records comes from the same bytes) and puts
every row in canonical form; each row is rendered and encoded (without truncation) the first time anyone asks
for it, and never again. The data checks, `loraft data show`, the end-of-turn rule and training all read this one
object: truncation to max_seq_length is a view (`for_training`), not a second encoding. Bad rows are collected,
not raised, so the data check can list them all; `require_valid` raises the first for a command that needs
every row. Before this, one `loraft train` of the quickstart opened each data file 4 times and encoded 560 rows
for 200 (scripts/count_data_passes.py).
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field

from lora_ft.config import DataSpec
from lora_ft.data.conversation import Conversation
from lora_ft.data.rows import (
    Encoded, Example, Row, SplitData, TrainingData, describe_sources, detect_format, examples_from_rows, read_data,
)
from lora_ft.errors import DataError

UNTRUNCATED = 10**9


@dataclass(frozen=True)
class PreparedSplit:
    name: str
    rows: tuple[Row, ...]
    examples: tuple[Example, ...]  # the rows that fit the format; row_of[i] is the index in rows
    row_of: tuple[int, ...]
    format_errors: tuple[DataError, ...]  # rows that do not fit the format, in file order
    conversation: Conversation = field(repr=False, compare=False)  # the run's format: renders and encodes each row
    train_on: str = "assistant"
    _encoded: dict = field(default_factory=dict, repr=False, compare=False)  # example index -> Encoded | DataError

    def encoding(self, i: int) -> Encoded | DataError:
        """Example i rendered and encoded without truncation (the error where its chat template fails); once."""
        if i not in self._encoded:
            self._encoded[i] = _encode_one(self.examples[i], self.conversation, self.train_on)
        return self._encoded[i]

    def encode_all(self) -> list[Encoded | DataError]:
        """Every example's encoding, in order; large splits are encoded by forked workers, one per core."""
        missing = [i for i in range(len(self.examples)) if i not in self._encoded]
        if missing:
            self._encoded.update(zip(missing, _encode_many([self.examples[i] for i in missing], self.conversation, self.train_on)))
        return [self._encoded[i] for i in range(len(self.examples))]

    @property
    def render_errors(self) -> list[tuple[int, DataError]]:
        return [(i, e) for i, e in enumerate(self.encode_all()) if isinstance(e, DataError)]

    def for_training(self, max_seq_length: int) -> SplitData:
        """The encoded rows cut to max_seq_length, rows with nothing left to learn dropped (a 0/0 loss)."""
        split = SplitData(self.name, list(self.rows), [])
        for item in self.encode_all():
            if isinstance(item, DataError):
                raise item
            view = truncate(item, max_seq_length)
            if view.trained_tokens == 0:
                split.dropped.append(view.where)
                continue
            split.encoded.append(view)
        if not split.encoded:
            raise DataError(
                f"{self.name} data: no row has a token to learn from after masking and truncation "
                f"(first: {split.dropped[0]}); check train_on and training.max_seq_length"
            )
        return split


def truncate(item: Encoded, max_seq_length: int) -> Encoded:
    if len(item.input_ids) <= max_seq_length:
        return item
    return Encoded(item.input_ids[:max_seq_length], item.labels[:max_seq_length], item.where, item.full_length,
                   item.trained_before_truncation)


@dataclass(frozen=True)
class PreparedData:
    spec: DataSpec
    format: str
    train: PreparedSplit
    eval: PreparedSplit | None
    digests: dict[str, str]  # role -> sha256 of the bytes read
    conversation: Conversation  # the run's conversation format (data/conversation.py), saved with the run

    @property
    def splits(self) -> tuple[PreparedSplit, ...]:
        return (self.train,) if self.eval is None else (self.train, self.eval)

    def counts(self) -> dict:
        return {"format": self.format, "train_rows": len(self.train.rows), "eval_rows": len(self.eval.rows) if self.eval else 0}

    def require_valid(self) -> None:
        """Raise the first row that does not fit the format (train, then eval)."""
        for split in self.splits:
            if split.format_errors:
                raise split.format_errors[0]

    def for_training(self, max_seq_length: int) -> TrainingData:
        """What training consumes: every row valid and encoded, cut to max_seq_length; raises the first bad row."""
        self.require_valid()
        train = self.train.for_training(max_seq_length)
        evaluation = self.eval.for_training(max_seq_length) if self.eval is not None else None
        return TrainingData(self.format, train, evaluation, describe_sources(self.spec, train, evaluation, self.digests),
                            conversation=self.conversation)


def prepare_data(spec: DataSpec, tokenizer, seed: int, *, model_eos=None) -> PreparedData:
    """Read the train and eval rows once and put each in the run's conversation format (encoding waits until a row
    is asked for). `model_eos`: the base's own EOS ids (its config's eos_token_id), among the run's stop ids."""
    train_rows, eval_rows, digests = read_data(spec, seed)
    fmt = detect_format(train_rows, spec)
    conversation = Conversation.for_training(tokenizer, fmt=fmt, system_prompt=spec.system_prompt, model_eos=model_eos)
    splits = [_split(name, rows, spec, conversation, fmt) for name, rows in (("train", train_rows), ("eval", eval_rows)) if rows]
    return PreparedData(spec, fmt, splits[0], splits[1] if len(splits) == 2 else None, digests, conversation)


def _split(name: str, rows: list[Row], spec: DataSpec, conversation: Conversation, fmt: str) -> PreparedSplit:
    errors: list[DataError] = []
    _, examples = examples_from_rows(rows, spec, conversation.tokenizer, fmt, errors=errors, conversation=conversation)
    index = {row.where: i for i, row in enumerate(rows)}
    return PreparedSplit(name, tuple(rows), tuple(examples), tuple(index[e.where] for e in examples), tuple(errors),
                         conversation, spec.train_on)


def _encode_one(example: Example, conversation: Conversation, train_on: str) -> Encoded | DataError:
    try:
        return conversation.encode(example, train_on=train_on, max_seq_length=UNTRUNCATED)
    except DataError as exc:  # e.g. the chat template fails on this row
        return exc


# Rendering the chat template and tokenizing is nearly all of the data's cost (~0.25 ms a row on one core,
# profiled: 3 template renders, one tokenization, the label mask), and batching the fast tokenizer did not
# help (offsets are built per row anyway). Rows are independent, so large splits are encoded by forked
# workers, one per core: they inherit the examples and tokenizer instead of pickling them.
PARALLEL_MIN_ROWS = 20_000
CHUNK_ROWS = 2_000
_WORK: dict = {}


def _encode_many(examples: list[Example], conversation: Conversation, train_on: str) -> list[Encoded | DataError]:
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 8)
    if workers < 2 or len(examples) < PARALLEL_MIN_ROWS or "fork" not in multiprocessing.get_all_start_methods():
        return [_encode_one(e, conversation, train_on) for e in examples]
    chunks = [(start, min(start + CHUNK_ROWS, len(examples))) for start in range(0, len(examples), CHUNK_ROWS)]
    _WORK.update(examples=examples, conversation=conversation, train_on=train_on)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return [item for chunk in pool.imap(_encode_chunk, chunks) for item in chunk]
    finally:
        _WORK.clear()


def _encode_chunk(bounds: tuple[int, int]) -> list[Encoded | DataError]:
    start, stop = bounds
    return [_encode_one(e, _WORK["conversation"], _WORK["train_on"]) for e in _WORK["examples"][start:stop]]
