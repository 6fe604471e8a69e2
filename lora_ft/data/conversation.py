"""The conversation format of a run: how a row becomes what the model reads, and where an answer stops.

One owner, used by train, eval, generate, chat and serve, and saved with the run (`conversation.json`, like
litgpt's prompt style) so that every later command prompts the adapter exactly as training showed it rows:

- row -> messages (`Conversation.example`, `Conversation.prompt`): chat, alpaca, prompt/completion and
  text rows. The system-prompt rule is training's: `data.system_prompt` goes in front of prompt rows (alpaca,
  prompt/completion) rendered through a chat template; chat rows bring their own, so a chat-trained run never
  saw it and is never served it. Saved as the run's `system_prompt` (None when training did not use it), which
  later goes in front of every conversation that has no system message of its own.
- messages -> ids: for training, with the character spans of the assistant turns as the loss (`encode`); for
  generation, up to the assistant's turn (`prompt_ids`); for a preference pair, a prompt and one answer
  (`encode_answer`). The rendering, the loss spans and the BOS rule (BOS in front of text without a template
  when the tokenizer puts one there) are data/encoding.py's; the run's choices above feed it.
- the end-of-turn token (the special token the template writes after an assistant message) and the stop ids
  (EOS, that token, the known end-of-turn tokens of common templates present in the vocabulary, and the base's
  own EOS ids): training measures "does the adapter stop" on them, and eval, generate, chat and serve stop on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from lora_ft.config_io import redact
from lora_ft.data.encoding import Encoded, Example, encode, leading_bos, render_chat, render_with_spans
from lora_ft.errors import DataError, LoraftError

FILE = "conversation.json"
VERSION = 1
ROLES = ("system", "user", "assistant", "tool")
FORMAT_FIELDS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
# Rows that get data.system_prompt: prompt rows, and preference rows (data/pairs.py puts it in front of every prompt).
PROMPT_FORMATS = ("alpaca", "prompt_completion", "pairs", "kto")
# End-of-turn tokens of common chat templates; each one present in the vocabulary is a stop id.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|end|>", "<|eom_id|>")
PROBE = "\u2063loraft-probe\u2063"  # invisible separators: no template rewrites them


# ---------------------------------------------------------------------------------------------
# The run's conversation


@dataclass(frozen=True)
class Conversation:
    """How one run renders conversations and where its answers stop. Build it with `for_training` (train) or
    `read`/`reconstruct` (every later command); the tokenizer is the run's own, saved beside it."""

    chat: bool  # rendered through the tokenizer's chat template (False: plain prompt + completion text)
    trained_format: str | None  # the row format training read (chat, alpaca, prompt_completion, text); None: unknown
    system_prompt: str | None  # in front of every conversation without a system message (training's rule)
    end_of_turn: str | None
    stop_ids: tuple[int, ...]
    bos: str | None  # put in front of plain text (no template) because the tokenizer puts it there itself
    stop_tokens: tuple[str, ...] = ()  # the stop ids as tokens, for engines that stop on strings (Ollama)
    tokenizer: Any = field(default=None, compare=False, repr=False)

    # --- building it

    @classmethod
    def for_training(cls, tokenizer, *, fmt: str, system_prompt: str | None, model_eos: Any = None) -> "Conversation":
        """The conversation of a run about to train on rows of format `fmt` with `data.system_prompt`."""
        chat = bool(getattr(tokenizer, "chat_template", None))
        stop_ids = stop_ids_for(tokenizer, model_eos)
        return cls(
            chat=chat,
            trained_format=fmt,
            system_prompt=system_prompt if chat and fmt in PROMPT_FORMATS else None,
            end_of_turn=end_of_turn_token(tokenizer),
            stop_ids=stop_ids,
            bos=leading_bos(tokenizer),
            stop_tokens=_names(tokenizer, stop_ids),
            tokenizer=tokenizer,
        )

    @classmethod
    def reconstruct(cls, tokenizer, *, fmt: str | None, system_prompt: str | None, stop_ids: Sequence[int] | None = None,
                    model_eos: Any = None) -> "Conversation":
        """A run saved before conversation.json existed: rebuilt from its config and generation_config.json. An
        unknown format keeps the system prompt (those runs were served it on every conversation)."""
        conversation = cls.for_training(tokenizer, fmt=fmt or "prompt_completion", system_prompt=system_prompt, model_eos=model_eos)
        if not stop_ids:
            return replace(conversation, trained_format=fmt)
        stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        return replace(conversation, trained_format=fmt, stop_ids=stop_ids, stop_tokens=_names(tokenizer, stop_ids))

    @classmethod
    def of_base(cls, tokenizer, *, model=None) -> "Conversation":
        """A base model prompted alone: its own template, no system prompt; it stops on EOS, every known end-of-turn
        token in its vocabulary and the model's own generation EOS ids."""
        conversation = cls.for_training(tokenizer, fmt="chat", system_prompt=None, model_eos=_generation_eos(model))
        return replace(conversation, trained_format=None)._checked()

    @classmethod
    def of_run(cls, run, tokenizer, *, model=None) -> "Conversation":
        """The conversation of a finished run folder (`run`: an artifacts.adapter_run.AdapterRun, `tokenizer` the one
        saved there): its conversation.json; for a run saved before that file existed, rebuilt from what the run
        recorded: the row format it trained on (manifest), its data.system_prompt (config.yaml) and its stop ids
        (generation_config.json)."""
        saved = cls.read(run.path, tokenizer)
        if saved is not None:
            return saved._checked()
        fmt = run.manifest.data.format if run.manifest is not None else None
        data = run.config.data if run.config is not None else None
        if fmt is None and data is not None and data.format != "auto":
            fmt = data.format
        recorded = None
        path = Path(run.path) / "generation_config.json"
        if path.is_file():
            try:
                recorded = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            except (OSError, ValueError, AttributeError):
                raise LoraftError(f"{path}: not readable JSON; the run folder is damaged") from None
            recorded = recorded if isinstance(recorded, list) else [recorded] if recorded is not None else None
        system_prompt = data.system_prompt if data is not None else None
        return cls.reconstruct(tokenizer, fmt=fmt, system_prompt=system_prompt, stop_ids=recorded,
                               model_eos=_generation_eos(model))._checked()

    def _checked(self) -> "Conversation":
        if not self.stop_ids:
            raise LoraftError("the tokenizer has no EOS or end-of-turn token, so generation could never stop; fix its tokenizer_config.json")
        return self

    # --- saved with the run

    def to_json(self) -> dict:
        return {
            "version": VERSION,
            "chat": self.chat,
            "trained_format": self.trained_format,
            "system_prompt": redact(self.system_prompt) if self.system_prompt else None,  # as config.yaml: no secrets
            "end_of_turn": self.end_of_turn,
            "stop_ids": list(self.stop_ids),
            "stop_tokens": list(self.stop_tokens),
            "bos": self.bos,
        }

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: str | Path, tokenizer) -> "Conversation | None":
        """The run's saved conversation, or None for a run saved before it existed. A damaged file is an error."""
        path = Path(folder) / FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LoraftError(f"{path}: not readable JSON ({exc}); the run folder is damaged") from None
        expected = {"version": int, "chat": bool, "trained_format": (str, type(None)), "system_prompt": (str, type(None)),
                    "end_of_turn": (str, type(None)), "stop_ids": list, "stop_tokens": list, "bos": (str, type(None))}
        if not isinstance(raw, dict) or set(raw) != set(expected) or raw.get("version") != VERSION:
            raise LoraftError(f"{path}: not a loraft conversation file (version {VERSION} with keys {', '.join(expected)})")
        for key, kind in expected.items():
            items = {"stop_ids": int, "stop_tokens": str}.get(key)
            if not isinstance(raw[key], kind) or (items and not all(isinstance(i, items) for i in raw[key])):
                raise LoraftError(f"{path}: {key} has the wrong type ({type(raw[key]).__name__}); the run folder is damaged")
        return cls(raw["chat"], raw["trained_format"], raw["system_prompt"], raw["end_of_turn"], tuple(raw["stop_ids"]),
                   raw["bos"], tuple(raw["stop_tokens"]), tokenizer)

    # --- row -> messages

    def example(self, data: dict, where: str, fmt: str, *, generation: bool = False) -> Example:
        """Canonical form of one row (fields already mapped); raises DataError for missing fields, wrong types, bad
        roles. `generation`: a conversation may end without an assistant turn, a prompt row without its answer."""
        if fmt == "text":
            return Example(None, _string(data, "text", where, allow_empty=False), where)
        if fmt == "chat":
            if not self.chat:
                raise DataError(f"{where}: chat rows need a chat template, and this tokenizer has none; set model.chat_template (e.g. chatml)")
            messages = self.with_system(_messages(data, where, generation=generation))
            return Example(tuple(messages), None, where, _tools(data, where))
        if fmt == "alpaca":
            instruction = _string(data, "instruction", where, allow_empty=False)
            extra = data.get("input") or ""
            if not isinstance(extra, str):
                raise DataError(f"{where}: field 'input' must be a string")
            prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            completion = _answer(data, "output", where, generation)
        elif fmt == "prompt_completion":
            prompt = _string(data, "prompt", where, allow_empty=False)
            completion = _answer(data, "completion", where, generation)
        else:
            raise DataError(f"{where}: unknown row format {fmt!r}")
        if self.chat:
            messages = self.with_system([{"role": "user", "content": prompt}])
            answer = [] if completion is None else [{"role": "assistant", "content": completion}]
            return Example(tuple(messages + answer), None, where)
        # No chat template: the prompt is plain text, the completion follows it directly.
        answer = [] if completion is None else [{"role": "completion", "content": completion}]
        return Example(({"role": "prompt", "content": prompt}, *answer), None, where)

    def prompt(self, data: dict, where: str) -> tuple[list[dict], str | None]:
        """A prompt row (`loraft generate`, eval) -> (messages to continue, reference answer or None). The format is
        read from the row's own fields; a trailing assistant turn or completion is the reference."""
        fmt = next((f for f in ("chat", "prompt_completion", "alpaca") if FORMAT_FIELDS[f][0] in data), None)
        if fmt is None and "conversations" in data:
            fmt = "chat"
        if fmt is None:
            raise DataError(f"{where}: a prompt row needs 'prompt', 'instruction' or 'messages' (fields: {', '.join(sorted(map(str, data)))})")
        messages = list(self.example(data, where, fmt, generation=True).messages)
        reference = None
        if messages[-1]["role"] in ("assistant", "completion"):
            reference = messages.pop()["content"]
        if self.chat and messages[-1]["role"] != "user":
            raise DataError(f"{where}: the conversation must end with a user turn (or a user turn and its reference answer)")
        return messages, reference

    def with_system(self, messages: Sequence[dict]) -> list[dict]:
        """The run's system prompt in front of a conversation that has none (training's rule, see the module doc)."""
        messages = list(messages)
        if self.system_prompt and self.chat and not any(m.get("role") in ("system", "prompt") for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    # --- messages -> ids

    def render_with_spans(self, example: Example) -> tuple[str, list[tuple[int, int]]]:
        return render_with_spans(example, self.tokenizer)

    def encode(self, example: Example, *, train_on: str, max_seq_length: int) -> Encoded:
        """Training ids of one example, with the labels of its trained spans (the rest IGNORE)."""
        return encode(example, self.tokenizer, train_on=train_on, max_seq_length=max_seq_length)

    def prompt_ids(self, messages: Sequence[dict], *, system: bool = True) -> list[int]:
        """Ids of a conversation up to the assistant's turn, rendered as in training. Messages with role "prompt"
        are plain text (BOS + text). `system=False`: the caller chose the system message (or none) itself."""
        messages = self.with_system(messages) if system else list(messages)
        if not messages:
            raise LoraftError("an empty conversation cannot be continued")
        if messages[0]["role"] == "prompt":
            return self.text_ids(messages[0]["content"])
        if not self.chat:
            raise LoraftError("chat messages need a chat template, and this tokenizer has none; send a plain prompt")
        text = render_chat(self.tokenizer, messages, add_generation_prompt=True, where="messages", what="conversation")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_ids(self, text: str) -> list[int]:
        """A plain-text prompt: BOS (the one rule) + text."""
        return list(self.tokenizer((self.bos or "") + text, add_special_tokens=False)["input_ids"])

    def encode_answer(self, prompt: Sequence[dict], answer: str | dict, *, max_seq_length: int, where: str = "pair") -> Encoded:
        """Prompt messages + one answer -> ids whose labels are the answer's tokens alone (with its end of turn).
        For preference pairs: the chosen and the rejected answer each through this, on the same prompt."""
        messages = self.with_system(prompt)
        if messages and messages[0]["role"] == "prompt" or not self.chat:
            if len(messages) != 1 or messages[0]["role"] not in ("prompt", "user"):
                raise DataError(f"{where}: without a chat template a prompt is one plain text")
            content = answer if isinstance(answer, str) else answer["content"]
            example = Example(({"role": "prompt", "content": messages[0]["content"]}, {"role": "completion", "content": content}), None, where)
        else:
            reply = {"role": "assistant", "content": answer} if isinstance(answer, str) else {"role": "assistant", **answer}
            example = Example((*messages, reply), None, where)
        return encode(example, self.tokenizer, train_on="last_assistant", max_seq_length=max_seq_length)


# ---------------------------------------------------------------------------------------------
# The end-of-turn token, the stop ids and the BOS rule, from the tokenizer


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the template puts right after an assistant message, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:
        return None
    after = text[text.find(PROBE) + len(PROBE) :] if PROBE in text else ""
    specials = sorted(set(tokenizer.all_special_tokens) | set(_added_tokens(tokenizer)), key=len, reverse=True)
    stripped = after.lstrip(" ")
    for token in specials:
        if token and stripped.startswith(token):
            return token
    return None


def _added_tokens(tokenizer) -> list[str]:
    try:
        return [t.content if hasattr(t, "content") else str(t) for t in tokenizer.added_tokens_decoder.values()]
    except AttributeError:
        return []


def stop_ids_for(tokenizer, model_eos: Any = None) -> tuple[int, ...]:
    """Every id that ends an answer: EOS, the template's end-of-turn token, each known end-of-turn token in the
    vocabulary, and the base's own EOS ids (`model_eos`, an id or a list, from its config)."""
    ids: set[int] = set()
    for token in (tokenizer.eos_token, end_of_turn_token(tokenizer)):
        token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if token_id is not None:
            ids.add(int(token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    if model_eos is not None:
        ids.update(int(i) for i in (model_eos if isinstance(model_eos, (list, tuple)) else [model_eos]))
    return tuple(sorted(ids))


def _names(tokenizer, ids: Sequence[int]) -> tuple[str, ...]:
    return tuple(str(t) for t in tokenizer.convert_ids_to_tokens(list(ids)))


def _generation_eos(model) -> Any:
    """A loaded model's own generation EOS ids (an id, a list, or None)."""
    return getattr(getattr(model, "generation_config", None), "eos_token_id", None)


# ---------------------------------------------------------------------------------------------
# Rows -> messages (the checks)


def _string(data: dict, name: str, where: str, *, allow_empty: bool) -> str:
    if name not in data or data[name] is None:
        raise DataError(f"{where}: missing field {name!r} (fields: {', '.join(sorted(map(str, data)))})")
    value = data[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _answer(data: dict, name: str, where: str, generation: bool) -> str | None:
    if generation and data.get(name) is None:
        return None
    return _string(data, name, where, allow_empty=True)


def _messages(data: dict, where: str, *, generation: bool = False) -> list[dict]:
    """The conversation as the template will see it: every field of every message is kept (ShareGPT's
    from/value become role/content). The order rules catch what no conversation means: two user or two
    assistant turns in a row (a tool result between assistant turns is the tool-use loop), a tool result
    that answers no assistant turn."""
    raw = data.get("messages", data.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {index} is not an object")
        out.append(_message(message, index, where))
    if not generation and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    turns = [(i, m["role"]) for i, m in enumerate(out) if m["role"] != "system"]
    if not turns:
        raise DataError(f"{where}: the conversation has only system messages")
    for (_, a), (i, b) in zip(turns, turns[1:]):
        if a == b and a in ("user", "assistant"):
            hint = "; tool results go between a tool call and the next assistant turn" if a == "assistant" else ""
            raise DataError(f"{where}: two {a} messages in a row; user and assistant turns must alternate{hint}")
        if b == "tool" and a not in ("assistant", "tool"):
            raise DataError(f"{where}: message {i} is a tool result after a {a} message; it must follow the "
                            "assistant turn that called the tool")
    if turns[0][1] == "tool":
        raise DataError(f"{where}: message {turns[0][0]} is a tool result before any assistant turn called a tool")
    return out


def _message(message: dict, index: int, where: str) -> dict:
    out = dict(message)
    if "role" not in out and "from" in out:  # ShareGPT style {from, value} is common enough to accept
        speaker = out.pop("from")
        out["role"] = {"human": "user", "gpt": "assistant"}.get(speaker, speaker)
    if "content" not in out and "value" in out:
        out["content"] = out.pop("value")
    role = out.get("role")
    if role not in ROLES:
        raise DataError(f"{where}: message {index} has role {role!r}; use one of {', '.join(ROLES)}")
    calls = out.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
        raise DataError(f"{where}: message {index} 'tool_calls' must be a list of objects on an assistant message")
    if out.get("content") is None and calls:
        out["content"] = ""  # OpenAI writes null content beside tool calls; templates concatenate strings
    if not isinstance(out.get("content"), str):
        raise DataError(f"{where}: message {index} content must be a string")
    return out


def _tools(data: dict, where: str) -> tuple[dict, ...] | None:
    tools = data.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):  # some datasets store the list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field 'tools' is a string that is not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: field 'tools' must be a list of tool definitions (objects)")
    return tuple(tools) or None
