"""Inference stage: load base+adapter once, prompt through the run's saved conversation, generate in batches.

Shared by `loraft eval`, `loraft generate` and `loraft chat` (their command modules import it) (`serve` prompts through the same `Conversation`), so all
see the same template, system-prompt rule, stop tokens and loader. Pitfalls guarded here:
- the tokenizer (and its chat template) comes from the run folder, exactly as trained, never from the base, and
  prompts are built by the run's `Conversation` (conversation.json), exactly as training built rows;
- generation stops on the run's stop ids (every end-of-turn id: ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`,
  ...), not only on the tokenizer's EOS: a model fine-tuned on ChatML that is only stopped at `</s>` never stops;
- batches are left-padded with an attention mask (transformers derives position ids from it), so a
  prompt's greedy output does not depend on the batch it lands in.
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import GenerationConfig, TextIteratorStreamer

from lora_ft.artifacts.adapter_run import AdapterRun
from lora_ft.config import ModelSpec
from lora_ft.data.conversation import Conversation
from lora_ft.errors import LoraftError
from lora_ft.model.loading import load_base_model, load_tokenizer, resolve_model_source, resolve_precision

BASE = "base"


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. Greedy by default: the same prompt gives the same answer on every run."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise LoraftError("--max-new-tokens: must be at least 1")
        if self.batch_size < 1:
            raise LoraftError("--batch-size: must be at least 1")
        if self.do_sample and self.temperature <= 0:
            raise LoraftError("--temperature: must be above 0 when sampling (use greedy decoding instead of 0)")

    def to_hf(self, eos_ids: Sequence[int], pad_id: int):
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k} if self.do_sample else {}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            repetition_penalty=self.repetition_penalty,
            eos_token_id=list(eos_ids),
            pad_token_id=pad_id,
            **sampling,
        )

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    stopped: bool  # ended with an end-of-turn/EOS id before max_new_tokens


@dataclass
class Inference:
    """A loaded base model with zero, one or two adapters, and what is needed to prompt it like in training."""

    model: object
    conversations: dict[str, Conversation]  # label -> the run's conversation (its saved tokenizer); base uses the first's
    labels: list[str]  # adapter labels in the order given (the base is always available as BASE)
    base_name: str
    base_matches: bool | None  # fingerprint check: True, False (forced), None (nothing recorded)
    runs: dict[str, AdapterRun] = field(default_factory=dict)
    base_weights: str = "full precision"  # or e.g. "4-bit nf4, as trained" (load_for_inference's as_trained)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @contextmanager
    def use(self, label: str) -> Iterator[None]:
        """Run the block with the base (adapter disabled) or with one adapter active."""
        if label == BASE:
            context = self.model.disable_adapter() if self.labels else nullcontext()
            with context:
                yield
            return
        if label not in self.labels:
            raise LoraftError(f"no adapter labelled {label!r}; loaded: {', '.join(self.labels) or 'none'}")
        self.model.set_adapter(label)
        yield

    def conversation(self, label: str = BASE) -> Conversation:
        return self.conversations.get(label) or self.conversations[BASE]

    def tokenizer(self, label: str = BASE):
        return self.conversation(label).tokenizer

    @property
    def eos_ids(self) -> dict[str, list[int]]:
        return {label: list(conversation.stop_ids) for label, conversation in self.conversations.items()}

    def render(self, messages: Sequence[dict], label: str = BASE, *, system: bool = True) -> list[int]:
        """Prompt ids as training rendered them, the run's system-prompt rule included (`system=False`: the
        caller chose the system message itself)."""
        return self.conversation(label).prompt_ids(messages, system=system)

    def generate(self, prompts: Sequence[list[int]], settings: GenerationSettings, label: str = BASE, *, progress=None) -> list[Generation]:
        with self.use(label):
            return generate_batched(
                self.model, self.tokenizer(label), prompts, settings, eos_ids=self.eos_ids[label], progress=progress,
                description=f"generating ({label})",
            )

    def stream(self, messages: Sequence[dict], settings: GenerationSettings, label: str = BASE, *, system: bool = True) -> Iterator[str]:
        """Yield the reply's text as it is generated (for `loraft chat`)."""
        tokenizer = self.tokenizer(label)
        ids = self.render(messages, label, system=system)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        config = settings.to_hf(self.eos_ids[label], tokenizer.pad_token_id)
        failure: list[BaseException] = []

        def work():
            try:
                torch.manual_seed(settings.seed)
                with self.use(label), torch.no_grad():
                    input_ids = torch.tensor([ids], device=self.device)
                    self.model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config, streamer=streamer
                    )
            except BaseException as exc:  # surfaced in the caller's thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if failure:
            raise failure[0]


def load_for_inference(
    adapter_dir: str | Path | Sequence[str | Path] | None,
    base: str | None = None,
    force: bool = False,
    *,
    precision: str = "auto",
    as_trained: bool = False,
) -> Inference:
    """Base + adapter(s) through AdapterRun.resolve_base (which refuses a wrong base) and PEFT.

    `adapter_dir` may be one folder, a list of up to two folders trained on the same base, or None with
    `base` set (the base alone, with its own tokenizer and template). `as_trained` loads a QLoRA run's base
    4-bit as training saw it (see AdapterRun.resolve_base); by default bases load in full precision.
    """
    dirs = [] if adapter_dir is None else [adapter_dir] if isinstance(adapter_dir, (str, Path)) else list(adapter_dir)
    if not dirs and not base:
        raise LoraftError("give --adapter DIR (or --base MODEL with --base-only)")
    if len(dirs) > 2:
        raise LoraftError("--adapter: at most two adapters can be compared at once")
    runs = [AdapterRun.load(d) for d in dirs]
    labels = _labels(runs)
    if runs:
        spec, source, matches = runs[0].resolve_base(base, force=force, as_trained=as_trained)
        for other in runs[1:]:
            # The second adapter must fit the same base weights (same fingerprint rule as merge).
            other.resolve_base(spec.name if base is None else base, force=force)
    else:
        spec = ModelSpec(name=base)
        source, matches = resolve_model_source(spec), None
    unquantized = ""
    if spec.quantization is not None and not torch.cuda.is_available():
        # bitsandbytes' 4-bit base needs CUDA: score on the full-precision base and say so.
        spec, unquantized = spec.model_copy(update={"quantization": None}), " (the run trained on a quantized base, which needs CUDA)"
    if precision == "auto" and runs and runs[0].config is not None:
        precision = runs[0].config.training.precision
    precision = resolve_precision(precision)
    model = load_base_model(spec, source, precision)
    if torch.cuda.is_available() and spec.quantization is None:  # a quantized base is placed by its device_map
        model = model.to("cuda")
    conversations = {BASE: Conversation.of_base(load_tokenizer(spec, source), model=model)}
    if runs:
        from peft import PeftModel  # lazy: peft ~3 s + bitsandbytes notes on stderr, not paid by generate's and serve's refusals

        model = PeftModel.from_pretrained(model, str(runs[0].path), adapter_name=labels[0])
        for label, run in zip(labels[1:], runs[1:]):
            model.load_adapter(str(run.path), adapter_name=label)
        for label, run in zip(labels, runs):
            conversations[label] = Conversation.of_run(run, run_tokenizer(run), model=model)
        # The base is measured on exactly the adapter's prompts: same template, same system prompt, same stop ids.
        conversations[BASE] = conversations[labels[0]]
        model.set_adapter(labels[0])
    model.eval()
    q = spec.quantization
    weights = "full precision" + unquantized if q is None else f"{q.bits}-bit{' ' + q.quant_type if q.bits == 4 else ''}, as trained"
    return Inference(model, conversations, labels, spec.name, matches, dict(zip(labels, runs)), weights)


def _labels(runs: list[AdapterRun]) -> list[str]:
    names = [re.sub(r"[^A-Za-z0-9_-]", "-", run.path.name) or "adapter" for run in runs]  # PEFT names sit in module paths
    if len(set(names)) < len(names) or BASE in names:
        names = [f"adapter{i + 1}" for i in range(len(runs))]
    return names


def run_tokenizer(run: AdapterRun):
    """The tokenizer saved in the run folder: the chat template exactly as trained."""
    return run.tokenizer()


# ---------------------------------------------------------------------------------------------
# Batched generation


def generate_batched(
    model, tokenizer, prompts: Sequence[list[int]], settings: GenerationSettings, *, eos_ids: Sequence[int],
    progress=None, description: str = "generating",
) -> list[Generation]:
    """Greedy (or sampled) continuations of token-id prompts, in input order.

    Prompts are sorted by length so each batch wastes little padding (and the longest batch runs
    first, so running out of memory shows at once); results are returned in the caller's order.
    """
    if not prompts:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = settings.to_hf(eos_ids, pad)
    stop = set(eos_ids)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    torch.manual_seed(settings.seed)
    with _progress(progress, description, len(prompts)) as advance, torch.no_grad():
        for start in range(0, len(order), settings.batch_size):
            chosen = order[start : start + settings.batch_size]
            width = max(len(prompts[i]) for i in chosen)
            input_ids = torch.full((len(chosen), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chosen), width), dtype=torch.long)
            for row, index in enumerate(chosen):
                ids = prompts[index]
                if not ids:
                    raise LoraftError("an empty prompt cannot be continued; give each row some text")
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config)
            for row, index in enumerate(chosen):
                new = output[row, width:].tolist()
                cut = next((k for k, token in enumerate(new) if token in stop), None)
                tokens = new if cut is None else new[:cut]
                results[index] = Generation(tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), cut is not None)
            advance(len(chosen))
    if was_training:
        model.train()
    return results  # type: ignore[return-value]


@contextmanager
def _progress(progress, description: str, total: int):
    """A rich progress bar on stderr (progress=None: default console; False: silent)."""
    if progress is False:
        yield lambda n: None
        return

    console = progress if progress is not None else Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
