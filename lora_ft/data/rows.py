"""Data stage: read rows, detect their format, and encode them into input_ids + labels.

Reads local JSONL/JSON/CSV/Parquet (or a Hub dataset) and accepts four row formats: chat
(`messages`), alpaca (`instruction`/`input`/`output`), `prompt`/`completion`, and plain `text`.
Rows with a prompt become a one-turn conversation when the tokenizer has a chat template, so the
model trains on exactly what it sees at inference.

Chat messages reach the template whole: besides role and content, fields such as `tool_calls`,
`reasoning_content` or `tool_call_id` are passed through, and a row's `tools` list goes to
`apply_chat_template(..., tools=...)`. Whatever the template renders for an assistant message (its tool
calls included) is trained with that turn; tool results are masked like user turns. A field the template
does not render is found by rendering with and without it (`ignored_fields`) and reported by the data check.

Loss masks are computed here, not by TRL: we render the conversation and find each assistant
turn by the character span it adds to the rendered text, then label the tokens inside those spans
(offset mapping). That works for any template, with or without `{% generation %}` markers. Bad rows
fail with file and line before any model loads. Nothing is cached on disk, so nothing can be stale.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lora_ft.config import DataSource, DataSpec
from lora_ft.errors import DataError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
FORMAT_FIELDS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


@dataclass(frozen=True)
class Row:
    """One raw row and where it came from (for messages that name file and line)."""

    data: dict
    where: str  # "path:line"


@dataclass(frozen=True)
class Example:
    """A row in canonical form: either a conversation (with the row's tool definitions, if any), or a plain text."""

    messages: tuple[dict, ...] | None
    text: str | None
    where: str
    tools: tuple[dict, ...] | None = None  # passed to apply_chat_template(tools=...)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    where: str
    full_length: int  # tokens before truncation
    trained_before_truncation: int

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


# ---------------------------------------------------------------------------------------------
# Reading files


def read_rows(source: DataSource) -> list[Row]:
    """All rows of one data source. Raises DataError naming file and line for anything malformed."""
    if not source.is_local:
        return _read_hub(source)
    path = Path(source.path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path}: is not a file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
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
    return rows


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


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None
    return [Row(item, f"{path}:row {i}") for i, item in enumerate(table.to_pylist())]


def _read_hub(source: DataSource) -> list[Row]:
    import datasets

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
    first = _mapped(rows[0].data, spec.fields)
    for fmt, needed in FORMAT_FIELDS.items():
        if all(name in first for name in needed):
            return fmt
    if "conversations" in first:
        return "chat"
    raise DataError(
        f"{rows[0].where}: cannot tell the row format from fields {sorted(rows[0].data)}; expected one of "
        "messages | instruction+output | prompt+completion | text (or set data.format and data.fields)"
    )


def _mapped(data: dict, fields: dict[str, str]) -> dict:
    if not fields:
        return data
    out = dict(data)
    for ours, theirs in fields.items():
        if theirs in data:
            out[ours] = data[theirs]
    return out


def to_example(row: Row, fmt: str, spec: DataSpec, *, use_chat: bool) -> Example:
    """Canonical form of one row; raises DataError for missing fields, wrong types, bad roles."""
    data = _mapped(row.data, spec.fields)
    if fmt == "text":
        return Example(None, _string(data, "text", row, allow_empty=False), row.where)
    if fmt == "chat":
        return Example(_messages(data, row), None, row.where, _tools(data, row))
    if fmt == "alpaca":
        instruction = _string(data, "instruction", row, allow_empty=False)
        extra = data.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{row.where}: field 'input' must be a string")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        completion = _string(data, "output", row, allow_empty=True)
    else:
        prompt = _string(data, "prompt", row, allow_empty=False)
        completion = _string(data, "completion", row, allow_empty=True)
    if use_chat:
        messages = []
        if spec.system_prompt:
            messages.append({"role": "system", "content": spec.system_prompt})
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return Example(tuple(messages), None, row.where)
    # No chat template: the prompt is plain text, the completion follows it directly.
    return Example(({"role": "prompt", "content": prompt}, {"role": "completion", "content": completion}), None, row.where)


def _string(data: dict, name: str, row: Row, *, allow_empty: bool) -> str:
    if name not in data or data[name] is None:
        raise DataError(f"{row.where}: missing field {name!r} (fields: {', '.join(sorted(map(str, data)))})")
    value = data[name]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{row.where}: field {name!r} is empty")
    return value


def _messages(data: dict, row: Row) -> tuple[dict, ...]:
    """The conversation as the template will see it: every field of every message is kept (ShareGPT's
    from/value become role/content). The order rules catch what no conversation means: two user or two
    assistant turns in a row (a tool result between assistant turns is the tool-use loop), a tool result
    that answers no assistant turn."""
    raw = data.get("messages", data.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{row.where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise DataError(f"{row.where}: message {index} is not an object")
        out.append(_message(message, index, row))
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{row.where}: the conversation has no assistant message to learn from")
    turns = [(i, m["role"]) for i, m in enumerate(out) if m["role"] != "system"]
    for (_, a), (i, b) in zip(turns, turns[1:]):
        if a == b and a in ("user", "assistant"):
            hint = "; tool results go between a tool call and the next assistant turn" if a == "assistant" else ""
            raise DataError(f"{row.where}: two {a} messages in a row; user and assistant turns must alternate{hint}")
        if b == "tool" and a not in ("assistant", "tool"):
            raise DataError(f"{row.where}: message {i} is a tool result after a {a} message; it must follow the "
                            "assistant turn that called the tool")
    if turns[0][1] == "tool":
        raise DataError(f"{row.where}: message {turns[0][0]} is a tool result before any assistant turn called a tool")
    return tuple(out)


def _message(message: dict, index: int, row: Row) -> dict:
    out = dict(message)
    if "role" not in out and "from" in out:  # ShareGPT style {from, value} is common enough to accept
        speaker = out.pop("from")
        out["role"] = {"human": "user", "gpt": "assistant"}.get(speaker, speaker)
    if "content" not in out and "value" in out:
        out["content"] = out.pop("value")
    role = out.get("role")
    if role not in ROLES:
        raise DataError(f"{row.where}: message {index} has role {role!r}; use one of {', '.join(ROLES)}")
    calls = out.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
        raise DataError(f"{row.where}: message {index} 'tool_calls' must be a list of objects on an assistant message")
    if out.get("content") is None and calls:
        out["content"] = ""  # OpenAI writes null content beside tool calls; templates concatenate strings
    if not isinstance(out.get("content"), str):
        raise DataError(f"{row.where}: message {index} content must be a string")
    return out


def _tools(data: dict, row: Row) -> tuple[dict, ...] | None:
    tools = data.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):  # some datasets store the list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise DataError(f"{row.where}: field 'tools' is a string that is not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{row.where}: field 'tools' must be a list of tool definitions (objects)")
    return tuple(tools) or None


def message_text(message: dict) -> str:
    """What a message says, as plain text for comparing rows: its content, then its other fields as JSON."""
    extra = {k: v for k, v in message.items() if k not in ("role", "content")}
    if not extra:
        return message["content"]
    return "\n".join(filter(None, (message["content"], json.dumps(extra, sort_keys=True, ensure_ascii=False))))


# ---------------------------------------------------------------------------------------------
# Encoding


def render_with_spans(example: Example, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The text the model sees and the character spans of every assistant turn (or completion)."""
    if example.text is not None:
        text = example.text + (tokenizer.eos_token or "")
        return text, [(0, len(text))]
    messages = list(example.messages)
    if messages[0]["role"] == "prompt":
        prompt, completion = messages[0]["content"], messages[1]["content"]
        bos = tokenizer.bos_token if _adds_bos(tokenizer) else ""
        text = bos + prompt + completion + (tokenizer.eos_token or "")
        return text, [(len(bos) + len(prompt), len(text))]
    tools, where = example.tools, example.where
    full = _render(tokenizer, messages, add_generation_prompt=False, where=where, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, where=where, tools=tools) if i else ""
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, where=where, tools=tools)
        if not full.startswith(through) or not through.startswith(before):
            raise DataError(
                f"{example.where}: the chat template renders turns differently in context; "
                "set model.chat_template to a template that renders conversations incrementally"
            )
        end = len(through.rstrip("\n "))  # the newline after an end-of-turn token is not part of the answer
        spans.append((len(before), max(end, len(before))))
    return full, spans


def _render(tokenizer, messages, *, add_generation_prompt: bool, where: str, tools=None) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=list(tools) if tools else None, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:
        raise DataError(f"{where}: the chat template failed on this row ({str(exc).splitlines()[0][:200]})") from None


def ignored_fields(example: Example, tokenizer) -> list[str]:
    """Fields of this conversation the chat template does not render: one name per occurrence (a message's
    field, or `tools` for the row's tool list). Found by rendering the conversation without each one in
    turn: the same text means the template never read it. A template that fails without a field uses it."""
    if example.messages is None or example.messages[0]["role"] == "prompt":
        return []
    messages = list(example.messages)
    extras = [(i, key) for i, m in enumerate(messages) for key in m if key not in ("role", "content")]
    if not extras and not example.tools:
        return []
    full = _render(tokenizer, messages, add_generation_prompt=False, where=example.where, tools=example.tools)

    def unchanged(variant: list[dict], tools) -> bool:
        try:
            return tokenizer.apply_chat_template(variant, tools=list(tools) if tools else None, tokenize=False) == full
        except Exception:
            return False

    ignored = []
    for i, key in extras:
        without = {k: v for k, v in messages[i].items() if k != key}
        if unchanged(messages[:i] + [without] + messages[i + 1 :], example.tools):
            ignored.append(key)
    if example.tools and unchanged(messages, None):
        ignored.append("tools")
    return ignored


def _adds_bos(tokenizer) -> bool:
    if tokenizer.bos_token is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def encode(example: Example, tokenizer, *, train_on: str, max_seq_length: int) -> Encoded:
    text, spans = render_with_spans(example, tokenizer)
    if train_on == "last_assistant" and spans:
        spans = spans[-1:]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [IGNORE] * len(ids)
        for index, (start, end) in enumerate(encoding["offset_mapping"]):
            if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
                labels[index] = ids[index]
    trained = sum(1 for label in labels if label != IGNORE)
    return Encoded(ids[:max_seq_length], labels[:max_seq_length], example.where, len(ids), trained)


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
        from datasets import Dataset

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


def load_rows(spec: DataSpec, seed: int) -> tuple[list[Row], list[Row] | None]:
    """Train and eval rows, with the eval split carved off reproducibly when asked."""
    train_rows = read_rows(spec.train)
    if spec.eval is not None:
        return train_rows, read_rows(spec.eval)
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
    rows: list[Row], spec: DataSpec, tokenizer, fmt: str | None = None, *, errors: list[DataError] | None = None
) -> tuple[str, list[Example]]:
    """Rows in canonical form. Raises on the first bad row, unless `errors` is given: then every bad
    row's DataError is appended there and the row skipped (the data check reports them all)."""
    fmt = fmt or detect_format(rows, spec)
    use_chat = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "chat" and not use_chat:
        raise DataError(
            f"{rows[0].where}: chat rows need a chat template, and this tokenizer has none; "
            "set model.chat_template (e.g. chatml)"
        )
    examples = []
    for row in rows:
        try:
            examples.append(to_example(row, fmt, spec, use_chat=use_chat))
        except DataError as exc:
            if errors is None:
                raise
            errors.append(exc)
    return fmt, examples


def encode_split(name: str, rows: list[Row], spec: DataSpec, tokenizer, max_seq_length: int, fmt: str) -> SplitData:
    _, examples = examples_from_rows(rows, spec, tokenizer, fmt)
    split = SplitData(name, rows, [])
    for example in examples:
        item = encode(example, tokenizer, train_on=spec.train_on, max_seq_length=max_seq_length)
        if item.trained_tokens == 0:
            # A row whose every label is masked adds nothing but a 0/0 loss; keep it out.
            split.dropped.append(item.where)
            continue
        split.encoded.append(item)
    if not split.encoded:
        raise DataError(
            f"{name} data: no row has a token to learn from after masking and truncation "
            f"(first: {split.dropped[0]}); check train_on and training.max_seq_length"
        )
    return split


def load_training_data(spec: DataSpec, tokenizer, *, max_seq_length: int, seed: int) -> TrainingData:
    train_rows, eval_rows = load_rows(spec, seed)
    fmt = detect_format(train_rows, spec)
    train = encode_split("train", train_rows, spec, tokenizer, max_seq_length, fmt)
    evaluation = encode_split("eval", eval_rows, spec, tokenizer, max_seq_length, fmt) if eval_rows else None
    return TrainingData(fmt, train, evaluation, describe_sources(spec, train, evaluation))


def describe_sources(spec: DataSpec, train: SplitData, evaluation: SplitData | None) -> list[dict]:
    from lora_ft.artifacts.run_dir import file_sha256

    out = []
    for role, source, split in (("train", spec.train, train), ("eval", spec.eval, evaluation)):
        if source is None:
            continue
        entry: dict[str, Any] = {"role": role, "path": source.path}
        if source.is_local:
            entry["sha256"] = file_sha256(Path(source.path).expanduser())
        else:
            entry["split"] = source.split
        if split is not None:
            entry.update(rows=len(split.rows), used=len(split.encoded), tokens=split.tokens)
        out.append(entry)
    if spec.eval is None and evaluation is not None:
        out.append({"role": "eval", "split_from": "train", "fraction": spec.eval_fraction, "rows": len(evaluation.rows)})
    return out


def validate_rows(spec: DataSpec, tokenizer_has_template: bool, seed: int) -> dict:
    """The data checks `validate` and `train` share before a model loads: files parse, rows fit their format."""
    train_rows, eval_rows = load_rows(spec, seed)
    fmt = detect_format(train_rows, spec)
    for rows in (train_rows, eval_rows or []):
        for row in rows:
            to_example(row, fmt, spec, use_chat=tokenizer_has_template)
    return {"format": fmt, "train_rows": len(train_rows), "eval_rows": len(eval_rows or [])}


def iter_texts(examples: Iterable[Example]) -> Iterable[str]:
    for example in examples:
        if example.text is not None:
            yield example.text
        else:
            yield "\n".join(message_text(m) for m in example.messages)
