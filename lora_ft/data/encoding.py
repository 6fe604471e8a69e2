"""A row in canonical form, rendered to the text the model reads, and encoded with its loss mask.

`render_with_spans` renders an `Example` (through the chat template, or plain BOS + prompt + completion + EOS)
and finds the character span of every assistant turn by the text that turn adds; `encode` tokenizes with the
offset mapping and labels the tokens inside those spans (the rest IGNORE). That works for any template, with or
without `{% generation %}` markers, so loss masks are computed here, not by TRL. `leading_bos` is the one BOS
rule for text without a template. Which rows become which messages, the system prompt and the stop ids are
the run's conversation format (data/conversation.py), built on this.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_ft.errors import DataError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """A row in canonical form: either a conversation (with the row's tool definitions, if any), or a plain text.

    Without a chat template a prompt row is the two messages {role: prompt} and {role: completion}."""

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


def render_with_spans(example: Example, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The text the model sees and the character spans of every assistant turn (or completion, or text)."""
    bos = leading_bos(tokenizer) or ""
    if example.text is not None:
        text = bos + example.text + (tokenizer.eos_token or "")
        return text, [(len(bos), len(text))]
    messages = list(example.messages)
    if messages[0]["role"] == "prompt":
        prompt, completion = messages[0]["content"], messages[1]["content"]
        text = bos + prompt + completion + (tokenizer.eos_token or "")
        return text, [(len(bos) + len(prompt), len(text))]
    tools, where = example.tools, example.where
    full = render_chat(tokenizer, messages, add_generation_prompt=False, where=where, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, where=where, tools=tools) if i else ""
        through = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False, where=where, tools=tools)
        if not full.startswith(through) or not through.startswith(before):
            raise DataError(
                f"{example.where}: the chat template renders turns differently in context; "
                "set model.chat_template to a template that renders conversations incrementally"
            )
        end = len(through.rstrip("\n "))  # the newline after an end-of-turn token is not part of the answer
        spans.append((len(before), max(end, len(before))))
    return full, spans


def render_chat(tokenizer, messages, *, add_generation_prompt: bool, where: str, tools=None, what: str = "row") -> str:
    """Messages -> text through the tokenizer's chat template; a template that fails is one DataError naming `where`."""
    try:
        return tokenizer.apply_chat_template(
            messages, tools=list(tools) if tools else None, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:
        raise DataError(f"{where}: the chat template failed on this {what} ({str(exc).splitlines()[0][:200]})") from None


def encode(example: Example, tokenizer, *, train_on: str, max_seq_length: int) -> Encoded:
    """Training ids of one example, labelled inside its trained spans (`train_on`: assistant, last_assistant or all)."""
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
    full = render_chat(tokenizer, messages, add_generation_prompt=False, where=example.where, tools=example.tools)

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


def leading_bos(tokenizer) -> str | None:
    """BOS when the tokenizer puts it in front of text on its own (Llama, Mistral), else None (ChatML models)."""
    if tokenizer.bos_token is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if probe and probe[0] == tokenizer.bos_token_id else None
