"""Preference data: rows of pairs (prompt/chosen/rejected) and of KTO's unpaired prompt/completion/label,
read, checked for shape and encoded into token ids.

Every answer goes through the same conversation format as an SFT row (`data/rows.py`: the chat template, the
system prompt, the end-of-turn token, plain prompt+completion without a template), rendered and tokenized as
ONE text (prompt + answer), the answer's tokens found by their character span. Templating the prompt and the
answer separately and concatenating the ids, as some tools do, can drop or change the first answer tokens and
the end-of-turn token. `answer_ids` is the one function that does this, through data/conversation.py's
`encode_answer`.

Accepted rows (field names can be mapped with data.fields):
- `prompt`, `chosen`, `rejected` as strings;
- `prompt` as a list of messages (the shared prompt conversation), `chosen`/`rejected` as a string, one
  assistant message, or a list holding one;
- only `chosen` and `rejected`, each a whole conversation: the prompt is every message before the last one;
- KTO: `prompt`, `completion` (same forms as chosen) and a boolean `label`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lora_ft.config import DataSpec
from lora_ft.data.conversation import Conversation
from lora_ft.data.rows import IGNORE, Example, Row, describe_sources, load_rows, map_fields, to_example
from lora_ft.errors import DataError

PAIR_FIELDS = ("chosen", "rejected")
KTO_FIELDS = ("prompt", "completion", "label")
NO_LIMIT = 1 << 30


@dataclass(frozen=True)
class Answer:
    """One answer in the conversation format: the prompt and answer rendered together."""

    example: Example
    text: str  # the answer as written (for comparing chosen and rejected)
    prompt_key: str  # the prompt as rendered into this answer's conversation (JSON of its messages)


@dataclass(frozen=True)
class PairRow:
    where: str
    prompt_text: str  # the prompt as plain text, for grouping by prompt
    chosen: Answer
    rejected: Answer | None  # None for a KTO row
    label: bool | None = None  # KTO: is the completion desirable


@dataclass
class EncodedPair:
    """Token ids as the trainer sees them, after the length limits; *_full are the lengths before."""

    where: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    prompt_full: int
    chosen_full: int
    rejected_full: int | None
    same_prompt: bool  # chosen and rejected rendered the same prompt tokens
    label: bool | None = None

    @property
    def answers(self) -> list[tuple[str, list[int], int]]:
        out = [("chosen" if self.label is None else "completion", self.chosen_ids, self.chosen_full)]
        if self.rejected_ids is not None:
            out.append(("rejected", self.rejected_ids, self.rejected_full))
        return out

    @property
    def emptied(self) -> bool:
        return any(full > 0 and not ids for _, ids, full in self.answers)

    @property
    def cut(self) -> bool:
        return any(0 < len(ids) < full for _, ids, full in self.answers) or len(self.prompt_ids) < self.prompt_full

    @property
    def truncated(self) -> bool:
        return self.cut or self.emptied


@dataclass
class PairSplit:
    name: str
    rows: list[Row]
    pairs: list[PairRow]
    errors: list[str] = field(default_factory=list)
    encoded: list[EncodedPair] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # rows with an emptied answer, kept out of training

    @property
    def tokens(self) -> int:
        return sum(len(e.prompt_ids) + sum(len(ids) for _, ids, _ in e.answers) for e in self.encoded)

    @property
    def trained_tokens(self) -> int:
        return sum(len(ids) for e in self.encoded for _, ids, _ in e.answers)

    def to_dataset(self):
        """Columns TRL's preference collators read (DPO: prompt/chosen/rejected ids; KTO: prompt/completion ids, label)."""
        from datasets import Dataset  # lazy: ~1 s; train and validate import this module before their 0.6 s refusals

        if self.encoded and self.encoded[0].label is not None:
            return Dataset.from_dict({
                "prompt_ids": [e.prompt_ids for e in self.encoded],
                "completion_ids": [e.chosen_ids for e in self.encoded],
                "label": [e.label for e in self.encoded],
            })
        return Dataset.from_dict({
            "prompt_ids": [e.prompt_ids for e in self.encoded],
            "chosen_ids": [e.chosen_ids for e in self.encoded],
            "rejected_ids": [e.rejected_ids for e in self.encoded],
        })


@dataclass
class PreferenceData:
    """What the preference trainer, its checks and its scores read; shaped like rows.TrainingData for the manifest."""

    format: str  # pairs | kto
    train: PairSplit
    eval: PairSplit | None
    sources: list[dict]
    heldout_overlap: dict | None = None
    conversation: Conversation | None = None  # the run's conversation format, saved with the run


# ---------------------------------------------------------------------------------------------
# Reading


def detect_preference_format(rows: list[Row], spec: DataSpec) -> str:
    first = map_fields(rows[0].data, spec.fields)
    if all(name in first for name in PAIR_FIELDS):
        return "pairs"
    if all(name in first for name in KTO_FIELDS):
        return "kto"
    raise DataError(
        f"{rows[0].where}: preference rows need prompt/chosen/rejected (dpo) or prompt/completion/label (kto); "
        f"this row has fields {sorted(rows[0].data)} (map yours with data.fields)"
    )


def read_pairs(rows: list[Row], spec: DataSpec, tokenizer, fmt: str, *, errors: list[str] | None = None) -> list[PairRow]:
    """Rows in canonical form. Raises on the first bad row, unless `errors` is given (then collected there)."""
    use_chat = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for row in rows:
        try:
            out.append(_pair_row(row, spec, fmt, use_chat))
        except DataError as exc:
            if errors is None:
                raise
            errors.append(str(exc))
    return out


def _pair_row(row: Row, spec: DataSpec, fmt: str, use_chat: bool) -> PairRow:
    data = map_fields(row.data, spec.fields)
    if fmt == "kto":
        label = data.get("label")
        if not isinstance(label, bool):
            raise DataError(f"{row.where}: field 'label' must be true or false, got {label!r}")
        prompt = _prompt(data, row, "completion")
        completion = _answer(prompt, data.get("completion"), "completion", row, spec, use_chat)
        return PairRow(row.where, _prompt_text(prompt), completion, None, label)
    prompt = _prompt(data, row, "chosen")
    chosen = _answer(prompt, data.get("chosen"), "chosen", row, spec, use_chat)
    rejected = _answer(_prompt(data, row, "rejected"), data.get("rejected"), "rejected", row, spec, use_chat)
    return PairRow(row.where, _prompt_text(prompt), chosen, rejected)


def _prompt(data: dict, row: Row, side: str) -> str | list[dict]:
    """The prompt: a string, a list of messages, or (no prompt field) the conversation before the last message."""
    prompt = data.get("prompt")
    if prompt is None:
        whole = data.get(side)
        if not isinstance(whole, list) or len(whole) < 2:
            raise DataError(f"{row.where}: no 'prompt' field, and {side!r} is not a conversation to take it from")
        return whole[:-1]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{row.where}: field 'prompt' is empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise DataError(f"{row.where}: field 'prompt' must be a string or a non-empty list of messages")


def _answer(prompt, value: Any, side: str, row: Row, spec: DataSpec, use_chat: bool) -> Answer:
    if value is None:
        raise DataError(f"{row.where}: missing field {side!r}")
    if isinstance(value, list):
        if "prompt" not in map_fields(row.data, spec.fields):
            value = value[-1:]  # a whole conversation: the prompt came from its earlier messages
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role", "assistant") != "assistant":
            raise DataError(f"{row.where}: {side!r} must be a string or one assistant message")
        value = value[0]
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise DataError(f"{row.where}: {side!r} must be a string or one assistant message, got {type(value).__name__}")
    if isinstance(prompt, str):
        example = to_example(Row({"prompt": prompt, "completion": value}, row.where), "prompt_completion", spec, use_chat=use_chat)
    else:
        if not use_chat:
            raise DataError(f"{row.where}: a prompt of chat messages needs a chat template; set model.chat_template")
        messages = list(prompt)
        if spec.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": spec.system_prompt})
        example = to_example(Row({"messages": [*messages, {"role": "assistant", "content": value}]}, row.where), "chat", spec,
                             use_chat=True)
    return Answer(example, value, json.dumps(list(example.messages[:-1]), sort_keys=True, ensure_ascii=False))


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


# ---------------------------------------------------------------------------------------------
# Encoding


def answer_ids(answer: Answer, tokenizer) -> tuple[list[int], int]:
    """(ids of prompt + answer rendered and tokenized together, index of the first answer token): the conversation
    format's `encode_answer`, so the answer is what SFT would train for that turn (its end-of-turn token included)."""
    *prompt, reply = answer.example.messages
    reply = reply if reply["role"] == "assistant" else reply["content"]
    item = _conversation(tokenizer).encode_answer(prompt, reply, max_seq_length=NO_LIMIT, where=answer.example.where)
    trained = [i for i, label in enumerate(item.labels) if label != IGNORE]
    if not trained:
        return item.input_ids, len(item.input_ids)
    return item.input_ids[: trained[-1] + 1], trained[0]


_CONVERSATION: list = []  # (tokenizer, its Conversation): building one renders probes, so once per tokenizer


def _conversation(tokenizer) -> Conversation:
    if not _CONVERSATION or _CONVERSATION[0][0] is not tokenizer:
        # The system prompt is already in each answer's messages (_answer), so none is added here.
        _CONVERSATION[:] = [(tokenizer, Conversation.for_training(tokenizer, fmt="pairs", system_prompt=None))]
    return _CONVERSATION[0][1]


def encode_pair(pair: PairRow, tokenizer, *, max_seq_length: int, max_prompt_length: int | None) -> EncodedPair:
    ids, start = answer_ids(pair.chosen, tokenizer)
    prompt, chosen = ids[:start], ids[start:]
    same_prompt, rejected = True, None
    if pair.rejected is not None:
        other, other_start = answer_ids(pair.rejected, tokenizer)
        same_prompt = other[:other_start] == prompt and pair.rejected.prompt_key == pair.chosen.prompt_key
        rejected = other[other_start:]
    full = (len(prompt), len(chosen), None if rejected is None else len(rejected))
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]  # the end of the prompt is what the answer follows
    room = max(max_seq_length - len(prompt), 0)
    chosen = chosen[:room]
    rejected = None if rejected is None else rejected[:room]
    return EncodedPair(pair.where, prompt, chosen, rejected, *full, same_prompt=same_prompt, label=pair.label)


# ---------------------------------------------------------------------------------------------
# The stage


def read_split(name: str, rows: list[Row], spec: DataSpec, tokenizer, fmt: str, *, collect: bool = False) -> PairSplit:
    errors: list[str] = []
    pairs = read_pairs(rows, spec, tokenizer, fmt, errors=errors if collect else None)
    return PairSplit(name, rows, pairs, errors)


def encode_split(split: PairSplit, tokenizer, *, max_seq_length: int, max_prompt_length: int | None) -> PairSplit:
    for pair in split.pairs:
        item = encode_pair(pair, tokenizer, max_seq_length=max_seq_length, max_prompt_length=max_prompt_length)
        if item.emptied:
            split.dropped.append(item.where)  # a pair with no answer token has a 0/0 (NaN) length-normalised loss
            continue
        split.encoded.append(item)
    if not split.encoded:
        raise DataError(f"{split.name} data: every pair has an answer emptied by the length limits (first: "
                        f"{split.dropped[0]}); raise training.max_seq_length or set preference.max_prompt_length")
    return split


def load_preference_data(spec: DataSpec, tokenizer, *, max_seq_length: int, max_prompt_length: int | None,
                         seed: int, model_eos=None) -> PreferenceData:
    train_rows, eval_rows = load_rows(spec, seed)
    fmt = detect_preference_format(train_rows, spec)
    limits = {"max_seq_length": max_seq_length, "max_prompt_length": max_prompt_length}
    train = encode_split(read_split("train", train_rows, spec, tokenizer, fmt), tokenizer, **limits)
    evaluation = None
    if eval_rows:
        evaluation = encode_split(read_split("eval", eval_rows, spec, tokenizer, fmt), tokenizer, **limits)
    # Saved with the run: pairs put data.system_prompt in front of every prompt, as prompt/completion rows do.
    conversation = Conversation.for_training(tokenizer, fmt=fmt, system_prompt=spec.system_prompt, model_eos=model_eos)
    return PreferenceData(fmt, train, evaluation, describe_sources(spec, train, evaluation), conversation=conversation)


def pair_rows_for_eval(rows: list[Row], spec: DataSpec, tokenizer, *, max_seq_length: int):
    """`loraft eval` on pairs: (the rows as SFT rows with the chosen answer as reference, the encoded pairs); None
    when the rows are not preference pairs."""
    try:
        fmt = detect_preference_format(rows, spec)
    except DataError:
        return None
    if fmt != "pairs":
        return None
    pairs = read_pairs(rows, spec, tokenizer, fmt)
    encoded = [encode_pair(p, tokenizer, max_seq_length=max_seq_length, max_prompt_length=None) for p in pairs]
    sft = []
    for pair in pairs:
        messages = pair.chosen.example.messages
        if messages[0]["role"] == "prompt":
            data = {"prompt": messages[0]["content"], "completion": messages[1]["content"]}
        else:
            data = {"messages": [m for m in messages if not (m["role"] == "system" and m["content"] == spec.system_prompt)]}
        sft.append(Row(data, pair.where))
    return sft, encoded


def validate_preference_rows(spec: DataSpec, tokenizer, seed: int, method: str) -> dict:
    """What `validate` and `train` check before a model loads: files parse, rows fit a preference format that
    matches the method."""
    train_rows, eval_rows = load_rows(spec, seed)
    fmt = detect_preference_format(train_rows, spec)
    wanted = "kto" if method == "kto" else "pairs"
    if fmt != wanted:
        need = "prompt/completion/label" if method == "kto" else "prompt/chosen/rejected"
        raise DataError(f"{train_rows[0].where}: training.method {method} needs {need} rows; these are {fmt} rows")
    for rows in (train_rows, eval_rows or []):
        read_pairs(rows, spec, tokenizer, fmt)
    return {"format": fmt, "train_rows": len(train_rows), "eval_rows": len(eval_rows or [])}
