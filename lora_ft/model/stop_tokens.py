"""Stop and turn tokens the base never learned: found before training, trained with the adapter, checked after.

A fine-tuned model stops by predicting its stop token (EOS, or the chat template's end-of-turn token) and
reads turns through the template's role/header tokens. Some bases never trained those rows: Llama 3 base
ships `<|eot_id|>` and its header tokens at (near) zero, and stories260K's `</s>` is the very vector of
`<unk>` and its 256 byte-fallback rows. A LoRA update of the inner linears cannot raise such a token
without raising its twins as much, so greedy decoding never stops, and nothing else complains.

- `check_stop_tokens` reads only the rows it needs (those tokens, the never-used kinds of rows and an even
  sample of the vocabulary) from the base's safetensors or GGUF file (model/embedding_rows.py) before any
  weights load, and flags a row that is near zero or the same vector as several other rows.
- `plan_token_training` turns `lora.train_tokens` into PEFT's `trainable_token_indices` (auto: the flagged
  rows only), so those rows train and are saved with the adapter; merge, eval, generate and inspect read
  them from there.
- `stop_score` measures, after training, how likely the model is to stop exactly where held-out answers end.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from lora_ft.artifacts.adapter import saved_token_rows
from lora_ft.data.conversation import PROBE, end_of_turn_token
from lora_ft.data.encoding import Example, render_with_spans
from lora_ft.errors import ConfigError, DataError
from lora_ft.model.embedding_rows import EmbeddingModules, RowReader, embedding_modules

# A row whose norm is below this share of the median norm of ordinary rows was never trained. Llama 3 base
# leaves its untrained rows at exactly 0 (~1e-23 in bf16); trained rows of any vocabulary sit within a small
# factor of the median, so 5% leaves a wide margin on both sides.
NEAR_ZERO = 0.05
# Two rows closer than 1% of the row's norm are the same vector for every purpose of the output layer (and
# of the first layer): stories260K's </s>, <unk> and byte-fallback rows differ by 0.03%.
TWIN_DISTANCE = 0.01
# "Indistinguishable from many other rows": a single near-copy can be a legitimate duplicate token.
MIN_TWINS = 2
# Vocabularies up to this size are read whole (a few MB); larger ones through a sample.
FULL_READ_ROWS = 8192
SAMPLE_ROWS = 2048
# After training: fewer held-out answers than this share end where greedy decoding would stop -> warn.
STOP_WARN_SHARE = 0.5
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

ROLE_ORDER = ("EOS", "end of turn", "BOS", "turn marker")


# ---------------------------------------------------------------------------------------------
# Which tokens the run relies on


@dataclass(frozen=True)
class ReliedToken:
    token: str
    id: int
    roles: tuple[str, ...]  # EOS, end of turn, BOS, turn marker


def relied_tokens(tokenizer) -> list[ReliedToken]:
    """EOS, the template's end-of-turn token, and every special token a rendered row contains (BOS, role
    headers such as <|im_start|> or <|start_header_id|>), rendered exactly as training renders rows."""
    roles: dict[int, list[str]] = {}

    def add(token_id, role):
        if token_id is not None and role not in roles.setdefault(token_id, []):
            roles[token_id].append(role)

    add(tokenizer.eos_token_id, "EOS")
    end_of_turn = end_of_turn_token(tokenizer)
    if end_of_turn is not None:
        add(tokenizer.convert_tokens_to_ids(end_of_turn), "end of turn")
    if getattr(tokenizer, "chat_template", None):
        messages = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE})
    else:
        messages = ({"role": "prompt", "content": "hi"}, {"role": "completion", "content": PROBE})
    try:
        text, _ = render_with_spans(Example(messages, None, "stop-token probe"), tokenizer)
        rendered = tokenizer(text, add_special_tokens=False)["input_ids"]
    except DataError:
        rendered = []
    specials = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token_id in rendered:
        if token_id in specials and token_id not in roles:
            add(token_id, "BOS" if token_id == tokenizer.bos_token_id else "turn marker")
    tokens = [ReliedToken(tokenizer.convert_ids_to_tokens(i), i, tuple(sorted(r, key=ROLE_ORDER.index))) for i, r in roles.items()]
    return sorted(tokens, key=lambda t: (ROLE_ORDER.index(t.roles[0]), t.id))


# ---------------------------------------------------------------------------------------------
# The check


@dataclass(frozen=True)
class RowCheck:
    matrix: str  # "input", "output", or "tied" (one matrix serves both)
    norm: float
    relative_norm: float  # to the median norm of the ordinary rows read
    twins: int  # other rows read that are the same vector (within TWIN_DISTANCE of its norm)
    twin_examples: tuple[str, ...]

    @property
    def verdict(self) -> str | None:
        if self.relative_norm < NEAR_ZERO:
            return "near-zero"
        if self.twins >= MIN_TWINS:
            return "collapsed"
        return None

    def reason(self, compared: int) -> str:
        where = {"input": "input embedding row", "output": "output-layer row", "tied": "embedding row (tied to the output layer)"}[self.matrix]
        if self.verdict == "near-zero":
            return f"its {where} is near zero (norm {self.norm:.2g}, {self.relative_norm:.1%} of a typical row's)"
        shown = ", ".join(self.twin_examples) + (", ..." if self.twins > len(self.twin_examples) else "")
        return f"its {where} is the same vector as {self.twins} other rows of the {compared} compared ({shown})"

    def to_json(self) -> dict:
        return {"matrix": self.matrix, "norm": self.norm, "relative_norm": self.relative_norm, "twins": self.twins,
                "twin_examples": list(self.twin_examples), "verdict": self.verdict}


@dataclass(frozen=True)
class TokenCheck:
    token: str
    id: int
    roles: tuple[str, ...]
    rows: tuple[RowCheck, ...]

    @property
    def flagged_rows(self) -> tuple[RowCheck, ...]:
        return tuple(r for r in self.rows if r.verdict)

    def to_json(self) -> dict:
        return {"token": self.token, "id": self.id, "roles": list(self.roles), "rows": [r.to_json() for r in self.rows],
                "untrained": bool(self.flagged_rows)}


@dataclass(frozen=True)
class StopTokenCheck:
    """What the run relies on to stop and frame turns, and which of those rows look untrained."""

    tokens: tuple[TokenCheck, ...]
    modules: EmbeddingModules | None
    compared: int  # rows read to compare with
    note: str | None = None  # why nothing could be checked

    @property
    def flagged(self) -> tuple[TokenCheck, ...]:
        return tuple(t for t in self.tokens if t.flagged_rows)

    def describe(self, token: TokenCheck) -> str:
        why = "; ".join(r.reason(self.compared) for r in token.flagged_rows)
        return f"{token.token} ({', '.join(token.roles)}, id {token.id}): never trained: {why}"

    def to_json(self) -> dict:
        return {
            "tokens": [t.to_json() for t in self.tokens],
            "untrained": [t.token for t in self.flagged],
            "rows_compared": self.compared,
            "tied_embeddings": self.modules.tied if self.modules else None,
            "note": self.note,
            "rule": f"untrained: row norm below {NEAR_ZERO:g} of the median row's, or within {TWIN_DISTANCE:g} "
                    f"(relative) of at least {MIN_TWINS} other rows",
        }


def check_stop_tokens(tokenizer, source, model_config, *, trust_remote_code: bool = False) -> StopTokenCheck:
    """Flag every relied-on token (EOS, end of turn, BOS, turn markers) whose input or output row looks untrained."""
    relied = relied_tokens(tokenizer)
    if not relied:
        return StopTokenCheck((), None, 0, "the tokenizer has no EOS and the template no special tokens")
    modules = embedding_modules(model_config, trust_remote_code)
    reader = RowReader(source)
    matrices = [("tied" if modules.tied or modules.output is None else "input", modules.input, "input")]
    if not modules.tied and modules.output is not None:
        matrices.append(("output", modules.output, "output"))
    n_rows = reader.n_rows(modules.input, "input")
    if n_rows is None:
        return StopTokenCheck(tuple(TokenCheck(t.token, t.id, t.roles, ()) for t in relied), modules, 0,
                              f"no embedding tensor found in {source.display}; stop-token rows not checked")
    candidates = [t.id for t in relied if t.id < n_rows]
    never_used = _never_used_ids(tokenizer, n_rows)
    if n_rows <= FULL_READ_ROWS:
        reference = list(range(n_rows))
    else:
        step = max(1, n_rows // SAMPLE_ROWS)
        reference = sorted(set(range(0, n_rows, step)) | set(never_used) | set(candidates))
    ordinary = [k for k, i in enumerate(reference) if i not in never_used and i not in candidates] or list(range(len(reference)))
    names = tokenizer.convert_ids_to_tokens(reference)
    per_token: dict[int, list[RowCheck]] = {i: [] for i in candidates}
    for matrix, module, role in matrices:
        rows = reader.rows(module, role, reference)
        if rows is None:
            continue
        norms = rows.norm(dim=1)
        typical = float(norms[ordinary].median()) or 1.0
        position = {i: k for k, i in enumerate(reference)}
        for token_id in candidates:
            k = position[token_id]
            distance = (rows - rows[k]).norm(dim=1)
            twins = [j for j in torch.nonzero(distance <= TWIN_DISTANCE * norms[k]).flatten().tolist() if j != k]
            per_token[token_id].append(RowCheck(
                matrix, float(norms[k]), float(norms[k]) / typical, len(twins),
                tuple(str(names[j]) for j in twins[:3]),
            ))
    tokens = tuple(TokenCheck(t.token, t.id, t.roles, tuple(per_token.get(t.id, ()))) for t in relied)
    return StopTokenCheck(tokens, modules, len(reference))


def _never_used_ids(tokenizer, n_rows: int) -> set[int]:
    """Rows that ordinary text never selects: special/added tokens and byte-fallback tokens (<0x00>...)."""
    ids = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    ids |= {i for token, i in tokenizer.get_vocab().items() if BYTE_TOKEN.match(token)}
    return {i for i in ids if i < n_rows}


# ---------------------------------------------------------------------------------------------
# What trains: lora.train_tokens -> PEFT's trainable_token_indices


@dataclass(frozen=True)
class TokenTraining:
    setting: str  # "auto", "off", or "list"
    rows: dict[str, tuple[int, ...]] = field(default_factory=dict)  # module path -> token ids whose rows train
    tokens: dict[int, str] = field(default_factory=dict)
    note: str | None = None

    @property
    def peft_indices(self) -> dict[str, list[int]] | None:
        return {module: list(ids) for module, ids in self.rows.items()} or None

    def trains(self, token_id: int) -> bool:
        return any(token_id in ids for ids in self.rows.values())

    def to_json(self) -> dict:
        return {"setting": self.setting, "rows": {m: list(ids) for m, ids in self.rows.items()},
                "tokens": [self.tokens[i] for i in sorted(self.tokens)], "note": self.note}


def plan_token_training(lora, check: StopTokenCheck, tokenizer) -> TokenTraining:
    """auto: the flagged rows of the flagged tokens; a list: those tokens' rows in every embedding matrix; off: none.
    A matrix already trained in full through lora.modules_to_save is left to it."""
    setting = lora.train_tokens
    if setting == "off":
        return TokenTraining("off")
    modules = check.modules
    if modules is None:
        return TokenTraining(setting if isinstance(setting, str) else "list", note=check.note)
    in_full = {m for m in (modules.input, modules.output) if m and m.rsplit(".", 1)[-1] in lora.modules_to_save}
    chosen: dict[str, set[int]] = {}
    if setting == "auto":
        for token in check.flagged:
            for row in token.flagged_rows:
                module = modules.output if row.matrix == "output" else modules.input
                chosen.setdefault(module, set()).add(token.id)
    else:
        if in_full:
            raise ConfigError(
                f"lora.train_tokens: {', '.join(sorted(in_full))} already trains in full (lora.modules_to_save); keep one of the two"
            )
        ids = [_token_id(tokenizer, token) for token in setting]
        for module in (modules.input, None if modules.tied else modules.output):
            if module:
                chosen[module] = set(ids)
    note = None
    output_side = [m for m in chosen if m == modules.output or modules.tied]
    if modules.output_bias and output_side:
        # PEFT 0.21's trained-rows forward of a Linear head leaves out its bias: the logits would be wrong.
        if setting != "auto":
            raise ConfigError("lora.train_tokens: this model's output layer has a bias, which PEFT 0.21 drops when its rows "
                              "train (huggingface/peft#3649); set lora.train_tokens: off")
        for module in output_side:
            del chosen[module]
        note = "the output layer has a bias, which PEFT 0.21 drops when its rows train (huggingface/peft#3649): not trained"
    for module in in_full & set(chosen):
        del chosen[module]
        note = f"{module} trains in full (lora.modules_to_save), so its rows need no separate training"
    rows = {module: tuple(sorted(ids)) for module, ids in chosen.items() if ids}
    token_ids = sorted({i for ids in rows.values() for i in ids})
    names = dict(zip(token_ids, tokenizer.convert_ids_to_tokens(token_ids)))
    return TokenTraining(setting if isinstance(setting, str) else "list", rows, names, note)


def expose_output_bias(peft_model) -> None:
    """Shim for PEFT 0.21: a TrainableTokensWrapper answers `.weight` (the trained rows merged in) but raises
    on `.bias` while its adapter is active, and TRL's fused LM head reads `lm_head.bias`. Give each wrapper
    its wrapped layer's bias as a plain attribute (not a registered parameter, so nothing is saved twice)."""
    from peft.utils.other import TrainableTokensWrapper

    for module in peft_model.modules():
        if isinstance(module, TrainableTokensWrapper) and "bias" not in module.__dict__:
            object.__setattr__(module, "bias", getattr(module.original_module, "bias", None))


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
        raise ConfigError(
            f"lora.train_tokens: {token!r} is not one token of this tokenizer (it splits into {len(pieces)}); "
            "list single tokens as the vocabulary spells them, e.g. </s> or <|eot_id|>"
        )
    return int(token_id)


def check_lines(check: StopTokenCheck, plan: TokenTraining) -> list[str]:
    """What validate and train print: one line per untrained token, with what happens to it."""
    if check.note:
        return [f"stop tokens: {check.note}"]
    if not check.flagged:
        named = ", ".join(f"{t.token} ({', '.join(t.roles)})" for t in check.tokens)
        return [f"stop tokens: {named}: embedding rows look trained"] if named else []
    lines = []
    for token in check.flagged:
        if plan.trains(token.id):
            fate = f"its rows train with the adapter (lora.train_tokens: {plan.setting})"
        else:
            fate = "NOT trained (lora.train_tokens: " + plan.setting + "): the model may never learn to stop; set lora.train_tokens: auto"
        lines.append(f"stop tokens: {check.describe(token)}; a LoRA update of the inner layers cannot raise it alone; {fate}")
    return lines


# ---------------------------------------------------------------------------------------------
# After training: how likely is the model to stop where held-out answers end?


@dataclass(frozen=True)
class StopScore:
    """At the last trained token of each held-out answer that is a stop token: the probability of stopping
    there (summed over the stop ids) and whether stopping is the most likely next token (greedy stops)."""

    mean_probability: float
    top1_share: float
    answers: int

    def to_json(self) -> dict:
        return {"mean_probability": self.mean_probability, "top1_share": self.top1_share, "answers": self.answers}


def stop_score(model, encoded, stop_ids, *, pad_token_id: int, batch_size: int = 8, disable_adapter: bool = False) -> StopScore | None:
    """None when no answer ends with a stop token (truncated rows, or a format without one)."""
    stop = sorted(set(stop_ids))
    ends = [(item, last) for item in encoded if (last := _answer_end(item.labels, stop)) is not None]
    if not ends:
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_index = torch.tensor(stop, device=device)
    probabilities, top1 = [], []
    context = model.disable_adapter() if disable_adapter else nullcontext()
    with context, torch.no_grad():
        for start in range(0, len(ends), batch_size):
            batch = ends[start : start + batch_size]
            width = max(last for _, last in batch)  # the answer's end is predicted from the token before it
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (item, last) in enumerate(batch):
                input_ids[row, :last] = torch.tensor(item.input_ids[:last])
                attention[row, :last] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            at = torch.tensor([last - 1 for _, last in batch], device=device)
            chosen = logits[torch.arange(len(batch), device=device), at].float()
            p = chosen.softmax(dim=-1)
            probabilities += p[:, stop_index].sum(dim=1).tolist()
            top1 += torch.isin(chosen.argmax(dim=-1), stop_index).tolist()
    if was_training:
        model.train()
    return StopScore(sum(probabilities) / len(probabilities), sum(top1) / len(top1), len(top1))


def _answer_end(labels: list[int], stop: list[int]) -> int | None:
    """Index of the last trained token when it is a stop token (the end of the final answer)."""
    last = next((i for i in range(len(labels) - 1, -1, -1) if labels[i] != -100), None)
    return last if last is not None and last > 0 and labels[last] in stop else None


def stop_warning(adapter: StopScore | None, check: StopTokenCheck, plan: TokenTraining) -> str | None:
    """The post-training warning, with its cause and fix, when too few held-out answers would stop."""
    if adapter is None or adapter.top1_share >= STOP_WARN_SHARE:
        return None
    head = (f"the adapter would stop at the end of only {adapter.top1_share:.0%} of {adapter.answers} held-out answers "
            f"(mean probability of stopping there {adapter.mean_probability:.3f}); greedy generation will run on. ")
    untrained = [t for t in check.flagged if not plan.trains(t.id)]
    if untrained:
        return head + f"Cause: {check.describe(untrained[0])}, and lora.train_tokens ({plan.setting}) left it frozen. Fix: set lora.train_tokens: auto"
    if check.flagged:
        names = ", ".join(t.token for t in check.flagged)
        return head + f"Cause: the rows of {names} trained but not far enough. Fix: train longer (training.epochs) or raise training.learning_rate"
    return head + ("Cause: the stop token's rows look trained, so the adapter has not learned where answers end. "
                   "Fix: check that answers end with it (loraft data show CONFIG) and train longer")


# ---------------------------------------------------------------------------------------------
# Trained rows in a saved adapter (inspect; artifacts/adapter.py reads them for merge and export)


@dataclass(frozen=True)
class TrainedRow:
    token: str
    id: int
    module: str
    norm_before: float | None  # the base's row (None when the base cannot be read)
    norm_after: float
    change: float | None  # ||after - before||

    def to_json(self) -> dict:
        return {"token": self.token, "id": self.id, "module": self.module, "norm_before": self.norm_before,
                "norm_after": self.norm_after, "change": self.change}


def trained_rows(run, state: dict, source=None) -> list[TrainedRow]:
    """The rows a run trained, how large they are now and how far they moved from the base's (inspect)."""
    saved = saved_token_rows(state, run.adapter_config)
    if not saved:
        return []
    names = {}
    recorded = (run.manifest.stop_tokens or {}) if run.manifest is not None else {}  # stop_tokens.py's own JSON
    for entry in recorded.get("check", {}).get("tokens", []):
        names[entry["id"]] = entry["token"]
    reader = RowReader(source) if source is not None else None
    out = []
    for module, (ids, after) in sorted(saved.items()):
        before = None
        if reader is not None:
            role = "output" if module.rsplit(".", 1)[-1] in ("lm_head", "output", "embed_out") else "input"
            try:
                before = reader.rows(module, role, ids)
            except Exception:  # inspect never fails for want of the base; it only loses the "before"
                before = None
        for k, token_id in enumerate(ids):
            row = after[k].float()
            b = before[k] if before is not None else None
            out.append(TrainedRow(
                names.get(token_id, f"id {token_id}"), token_id, module, float(b.norm()) if b is not None else None,
                float(row.norm()), float((row - b).norm()) if b is not None else None,
            ))
    return out
