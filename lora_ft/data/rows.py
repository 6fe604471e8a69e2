"""Data stage: read rows, detect their format, and encode them into input_ids + labels.

Reads local JSONL/JSON/CSV/Parquet (or a Hub dataset) and accepts four row formats: chat
(`messages`), alpaca (`instruction`/`input`/`output`), `prompt`/`completion`, and plain `text`.
How a row becomes messages and ids is the run's `Conversation` (conversation.py, saved with the run):
rows with a prompt become a one-turn conversation when the tokenizer has a chat template, so the
model trains on exactly what it sees at inference.

Chat messages reach the template whole: besides role and content, fields such as `tool_calls`,
`reasoning_content` or `tool_call_id` are passed through, and a row's `tools` list goes to
`apply_chat_template(..., tools=...)`. Whatever the template renders for an assistant message (its tool
calls included) is trained with that turn; tool results are masked like user turns. A field the template
does not render is found by rendering with and without it (`ignored_fields`) and reported by the data check.

Loss masks are computed by the conversation, not by TRL (see conversation.py). Bad rows
fail with file and line before any model loads. Nothing is cached on disk, so nothing can be stale.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lora_ft.artifacts.run_dir import file_sha256
from lora_ft.config import DataSource, DataSpec
# The conversation format lives in conversation.py, rendering and loss masks in encoding.py; their row and encoding
# names are re-exported for the stages here.
from lora_ft.data.conversation import FORMAT_FIELDS, PROMPT_FORMATS, Conversation  # noqa: F401
from lora_ft.data.encoding import IGNORE, Encoded, Example, encode, ignored_fields, render_with_spans  # noqa: F401
from lora_ft.errors import DataError


@dataclass(frozen=True)
class Row:
    """One raw row and where it came from (for messages that name file and line)."""

    data: dict
    where: str  # "path:line"


# ---------------------------------------------------------------------------------------------
# Reading files


def read_rows(source: DataSource) -> list[Row]:
    """All rows of one data source. Raises DataError naming file and line for anything malformed."""
    return read_source(source)[0]


def read_source(source: DataSource) -> tuple[list[Row], str | None]:
    """All rows of one data source and the sha256 of the bytes they were parsed from (None for a Hub
    dataset): one read of the file serves both, so the recorded hash is of exactly what trained."""
    if not source.is_local:
        return _read_hub(source), None
    path = Path(source.path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path}: is not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _read_parquet(raw, path)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not UTF-8 text; re-save the file as UTF-8") from None
        if suffix == ".jsonl":
            rows = _parse_jsonl(text, path)
        elif suffix == ".json":
            rows = _parse_json(text, path)
        elif suffix == ".csv":
            rows = _parse_csv(text, path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    if not rows:
        raise DataError(f"{path}: no rows; the file is empty")
    return rows, hashlib.sha256(raw).hexdigest()


def _parse_jsonl(text: str, path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(value).__name__}")
        rows.append(Row(value, f"{path}:{number}"))
    return rows


def _parse_json(text: str, path: Path) -> list[Row]:
    try:
        value = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    rows = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {index}: expected an object, got {type(item).__name__}")
        rows.append(Row(item, f"{path}:item {index}"))
    return rows


def _parse_csv(text: str, path: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        for values in reader:
            number = reader.line_num
            if not values:
                continue
            if len(values) != len(header):
                raise DataError(f"{path}:{number}: {len(values)} fields where the header has {len(header)}")
            rows.append(Row(dict(zip(header, values)), f"{path}:{number}"))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return rows


def _read_parquet(raw: bytes, path: Path) -> list[Row]:
    try:
        import pyarrow as pa  # lazy: pyarrow.parquet ~0.25 s, only for .parquet files; train's 0.6 s refusals import this module
        import pyarrow.parquet as pq  # lazy: as above

        table = pq.read_table(pa.BufferReader(raw))
    except Exception as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None
    return [Row(item, f"{path}:row {i}") for i, item in enumerate(table.to_pylist())]


def _read_hub(source: DataSource) -> list[Row]:
    import datasets  # lazy: ~1 s; train and validate import this module before their 0.6 s refusals

    try:
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split)
    except Exception as exc:
        raise DataError(
            f"data: cannot load Hub dataset {source.path!r} split {source.split!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); give a local file or check the id"
        ) from None
    return [Row(dict(item), f"{source.path}[{source.split}]:row {i}") for i, item in enumerate(dataset)]


# ---------------------------------------------------------------------------------------------
# Formats


def detect_format(rows: list[Row], spec: DataSpec) -> str:
    if spec.format != "auto":
        return spec.format
    first = map_fields(rows[0].data, spec.fields)
    for fmt, needed in FORMAT_FIELDS.items():
        if all(name in first for name in needed):
            return fmt
    if "conversations" in first:
        return "chat"
    raise DataError(
        f"{rows[0].where}: cannot tell the row format from fields {sorted(rows[0].data)}; expected one of "
        "messages | instruction+output | prompt+completion | text (or set data.format and data.fields)"
    )


def map_fields(data: dict, fields: dict[str, str]) -> dict:
    if not fields:
        return data
    out = dict(data)
    for ours, theirs in fields.items():
        if theirs in data:
            out[ours] = data[theirs]
    return out


def to_example(row: Row, fmt: str, spec: DataSpec, *, use_chat: bool) -> Example:
    """Canonical form of one row, as training reads it (conversation.Conversation.example with the data
    settings' system-prompt rule); raises DataError for missing fields, wrong types, bad roles."""
    conversation = Conversation(use_chat, fmt, spec.system_prompt if use_chat and fmt in PROMPT_FORMATS else None, None, (), None)
    return conversation.example(map_fields(row.data, spec.fields), row.where, fmt)


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class SplitData:
    name: str
    rows: list[Row]
    encoded: list[Encoded]
    dropped: list[str] = field(default_factory=list)  # rows with nothing left to learn (where)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.encoded)

    @property
    def trained_tokens(self) -> int:
        return sum(e.trained_tokens for e in self.encoded)

    def to_dataset(self):
        from datasets import Dataset  # lazy: ~1 s; train and validate import this module before their 0.6 s refusals

        return Dataset.from_dict(
            {"input_ids": [e.input_ids for e in self.encoded], "labels": [e.labels for e in self.encoded]}
        )


@dataclass
class TrainingData:
    format: str
    train: SplitData
    eval: SplitData | None
    sources: list[dict]
    heldout_overlap: dict | None = None  # eval rows with a copy in train (data_check.HeldoutOverlap), for the manifest
    conversation: Conversation | None = None  # the run's conversation format, saved with the run


def load_rows(spec: DataSpec, seed: int) -> tuple[list[Row], list[Row] | None]:
    """Train and eval rows, with the eval split carved off reproducibly when asked."""
    train_rows, eval_rows, _ = read_data(spec, seed)
    return train_rows, eval_rows


def read_data(spec: DataSpec, seed: int) -> tuple[list[Row], list[Row] | None, dict[str, str]]:
    """Train and eval rows (see load_rows) and the sha256 of each local file read ({role: digest}), each file read once."""
    train_rows, digest = read_source(spec.train)
    digests = {"train": digest} if digest else {}
    if spec.eval is not None:
        eval_rows, digest = read_source(spec.eval)
        return train_rows, eval_rows, {**digests, **({"eval": digest} if digest else {})}
    return (*split_off_eval(train_rows, spec, seed), digests)


def split_off_eval(train_rows: list[Row], spec: DataSpec, seed: int) -> tuple[list[Row], list[Row] | None]:
    if spec.eval_fraction > 0:
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train_rows) * spec.eval_fraction))
        if n_eval >= len(train_rows):
            raise DataError(f"data.eval_fraction: {spec.eval_fraction} leaves no training rows out of {len(train_rows)}")
        held = set(order[:n_eval])
        return [r for i, r in enumerate(train_rows) if i not in held], [train_rows[i] for i in sorted(held)]
    return train_rows, None


def examples_from_rows(
    rows: list[Row], spec: DataSpec, tokenizer, fmt: str | None = None, *, errors: list[DataError] | None = None,
    conversation: Conversation | None = None,
) -> tuple[str, list[Example]]:
    """Rows in canonical form. Raises on the first bad row, unless `errors` is given: then every bad
    row's DataError is appended there and the row skipped (the data check reports them all)."""
    fmt = fmt or detect_format(rows, spec)
    conversation = conversation or Conversation.for_training(tokenizer, fmt=fmt, system_prompt=spec.system_prompt)
    if fmt == "chat" and not conversation.chat:
        raise DataError(
            f"{rows[0].where}: chat rows need a chat template, and this tokenizer has none; "
            "set model.chat_template (e.g. chatml)"
        )
    examples = []
    for row in rows:
        try:
            examples.append(conversation.example(map_fields(row.data, spec.fields), row.where, fmt))
        except DataError as exc:
            if errors is None:
                raise
            errors.append(exc)
    return fmt, examples


def describe_sources(spec: DataSpec, train: SplitData, evaluation: SplitData | None, digests: dict[str, str] | None = None) -> list[dict]:
    """What the manifest records of each source; `digests` ({role: sha256} from read_data) spares a second read."""
    out = []
    for role, source, split in (("train", spec.train, train), ("eval", spec.eval, evaluation)):
        if source is None:
            continue
        entry: dict[str, Any] = {"role": role, "path": source.path}
        if source.is_local:
            entry["sha256"] = (digests or {}).get(role) or file_sha256(Path(source.path).expanduser())
        else:
            entry["split"] = source.split
        if split is not None:
            entry.update(rows=len(split.rows), used=len(split.encoded), tokens=split.tokens)
        out.append(entry)
    if spec.eval is None and evaluation is not None:
        out.append({"role": "eval", "split_from": "train", "fraction": spec.eval_fraction, "rows": len(evaluation.rows)})
    return out


def message_text(message: dict) -> str:
    """What a message says, as plain text for comparing rows: its content, then its other fields as JSON."""
    extra = {k: v for k, v in message.items() if k not in ("role", "content")}
    if not extra:
        return message["content"]
    return "\n".join(filter(None, (message["content"], json.dumps(extra, sort_keys=True, ensure_ascii=False))))


def iter_texts(examples: Iterable[Example]) -> Iterable[str]:
    for example in examples:
        if example.text is not None:
            yield example.text
        else:
            yield "\n".join(message_text(m) for m in example.messages)
