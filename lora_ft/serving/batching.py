"""The engine behind `loraft serve`: one base model, named LoRA adapters on one PeftModel, batches across adapters.

`ModelPool` loads the base once and each adapter as a named PEFT adapter, refusing one whose recorded base
fingerprint differs from the served base's. `Scheduler` runs every generation on one worker thread: it collects
waiting requests into a batch whatever their adapter and runs them in one `generate` call, each row with its own
adapter through PEFT's mixed-adapter batches (`adapter_names=[...]`, "__base__" for rows without one).

Pitfalls guarded here, so that under greedy decoding each response is token for token what `loraft generate`
gives with that adapter alone:
- isolation: in a batch of several adapters, PEFT chooses the adapter per row, never `set_adapter` (a global
  switch that the batch's tenants would share: the silent wrong-adapter failure); a batch of one adapter takes
  the plain path (`set_adapter` / `disable_adapter`), safe because one thread runs every batch;
- each row stops on its own stop ids (its run's end-of-turn tokens) and at its own max_tokens, through one
  stopping criterion; `eos_token_id=[]` keeps the model's own EOS default from stopping every row at once;
- rows are left-padded with an attention mask, as in `generate.generate_batched`;
- tokenizers are not safe to share between threads while one is being configured, so every encode and decode
  holds `TOKENIZER_LOCK`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from lora_ft.artifacts.adapter_run import AdapterRun, check_adapter_name, fits_model, remove_adapter
from lora_ft.artifacts.fingerprint import fingerprint_model_path
from lora_ft.config import ModelSpec
from lora_ft.data.conversation import Conversation
from lora_ft.errors import LoraftError
from lora_ft.model.loading import load_base_model, load_tokenizer, resolve_model_source, resolve_precision

BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch
TOKENIZER_LOCK = threading.Lock()


@dataclass(frozen=True)
class ServedModel:
    """One name a request can ask for: the base, or the base with one adapter, prompted through its run's conversation."""

    name: str
    conversation: Conversation  # the run's template, system-prompt rule, stop ids and tokenizer
    adapter: str  # PEFT adapter name, or BASE_ROW
    path: Path | None = None

    @property
    def tokenizer(self):
        return self.conversation.tokenizer

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(self.conversation.stop_ids)

    @property
    def has_template(self) -> bool:
        return self.conversation.chat

    def render_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation up to the assistant's turn, as `loraft chat` and `loraft generate` build them."""
        with TOKENIZER_LOCK:
            return self.conversation.prompt_ids(messages)

    def render_text(self, text: str) -> list[int]:
        """A raw completion prompt: BOS (if the tokenizer adds one) + text, as `loraft generate` does without a template."""
        with TOKENIZER_LOCK:
            return self.conversation.text_ids(text)


class ModelPool:
    """The base model, loaded once, and the adapters on it, by the names requests use."""

    def __init__(self, model, base: ServedModel, *, fingerprint: str | None, context_length: int, source=None):
        self.model = model
        self.base = base
        self.fingerprint = fingerprint
        self.source = source  # the base's ModelSource (None for a model built in memory)
        self.context_length = context_length
        self.adapters: dict[str, ServedModel] = {}

    @classmethod
    def load(cls, adapters: dict[str, str | Path], base: str | None = None, *, precision: str = "auto",
             force: bool = False) -> "ModelPool":
        """Load the base (default: the first adapter's recorded base) and every adapter, checked against it."""
        if not adapters and not base:
            raise LoraftError("give --adapter NAME=RUN_DIR (or --base MODEL to serve a base model alone)")
        for name in adapters:
            check_adapter_name(name, "--adapter")
        runs = {name: AdapterRun.load(path) for name, path in adapters.items()}
        first = next(iter(runs.values()), None)
        if first is not None:
            spec, source, _ = first.resolve_base(base, force=force)  # refuses a --base the first adapter was not trained on
        else:
            spec = ModelSpec(name=base)
            source = resolve_model_source(spec)
        if precision == "auto" and first is not None and first.config is not None:
            precision = first.config.training.precision
        fingerprint = fingerprint_model_path(source.path, source.gguf_file)
        model = load_base_model(spec, source, resolve_precision(precision))
        if torch.cuda.is_available():
            model = model.to("cuda")
        model.eval()
        tokenizer = load_tokenizer(spec, source)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        served_base = ServedModel(spec.name, Conversation.of_base(tokenizer, model=model), BASE_ROW)
        pool = cls(model, served_base, fingerprint=fingerprint, context_length=_context_length(model), source=source)
        for name, run in runs.items():
            pool.check(name, run, force=force)
            pool.attach(name, run)
        return pool

    @property
    def names(self) -> list[str]:
        return [self.base.name, *self.adapters]

    def get(self, name: str) -> ServedModel | None:
        return self.base if name == self.base.name else self.adapters.get(name)

    def check(self, name: str, run: AdapterRun, *, force: bool = False) -> None:
        """Refuse a bad or taken name, or an adapter trained on another base, before anything loads."""
        check_adapter_name(name)
        if name == BASE_ROW or name == self.base.name or name in self.adapters:
            taken = "is the base's name" if name == self.base.name else "is reserved" if name == BASE_ROW else "is already loaded"
            raise LoraftError(f"adapter name {name!r} {taken}; choose another")
        run.check_base(self.base.name, self.fingerprint, force=force, what=f"adapter {name!r}")
        fits_model(run, self.model, what=f"adapter {name!r}")

    def attach(self, name: str, run: AdapterRun) -> ServedModel:
        """Load the run's adapter under `name` (on the worker thread once the scheduler runs). All or nothing:
        when anything fails the model is left exactly as before (no half-loaded adapter keeps the name)."""
        tokenizer = run.tokenizer()  # the chat template exactly as trained
        try:
            if self._is_peft():
                self.model.load_adapter(str(run.path), adapter_name=name)
            else:
                from peft import PeftModel  # lazy: peft ~3 s + bitsandbytes notes on stderr, not paid by generate's and serve's refusals

                self.model = PeftModel.from_pretrained(self.model, str(run.path), adapter_name=name)
            self.model.eval()
            served = ServedModel(name, Conversation.of_run(run, tokenizer, model=self.model), name, run.path)
        except BaseException:
            self.model = remove_adapter(self.model, name)
            raise
        self.adapters[name] = served
        return served

    def add_loaded(self, name: str, conversation: Conversation) -> ServedModel:
        """Serve an adapter already on the PeftModel (benchmarks build random ones in memory)."""
        served = ServedModel(name, conversation, name)
        self.adapters[name] = served
        return served

    def detach(self, name: str) -> None:
        """Delete the adapter from the model (on the worker thread, after the requests queued before it)."""
        self.adapters.pop(name, None)
        self.model = remove_adapter(self.model, name)

    def _is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")


def _context_length(model) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


# ---------------------------------------------------------------------------------------------
# Requests and the scheduler


@dataclass(frozen=True)
class Sampling:
    """How a request decodes; requests batch together only when this is equal. Temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def normalized(self) -> "Sampling":
        return Sampling(0.0, 1.0) if self.greedy else self


class QueueFull(LoraftError):
    """The bounded queue holds as many waiting requests as it may (the API answers 503)."""


@dataclass(eq=False)
class Job:
    """One generation: its prompt, limits and adapter; `sink(kind, value)` receives its events from the worker.

    Events: ("text", delta) as text becomes final, then ("done", finish_reason) or ("error", message).
    """

    served: ServedModel
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling(0.0)
    stop_strings: tuple[str, ...] = ()
    sink: Callable[[str, object], None] = lambda kind, value: None
    stream: bool = True  # False: the text is decoded once at the end (unless stop strings need it sooner)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    _sent: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def accept(self, token: int) -> None:
        """Take the row's next token; finish on a stop id, a stop string or max_new_tokens."""
        if token in self.served.stop_ids:
            return self._finish("stop")
        self.tokens.append(token)
        if not self.stream and not self.stop_strings:
            if len(self.tokens) >= self.max_new_tokens:
                self._finish("length")
            return
        self._decode()
        cut = min((i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._finish("stop")
        if len(self.tokens) >= self.max_new_tokens:
            return self._finish("length")
        # Hold back a partly decoded character and anything that could still become a stop string.
        hold = max((len(s) - 1 for s in self.stop_strings), default=0)
        ready = len(self.text) - hold
        if self.text.endswith("\ufffd"):
            ready = min(ready, len(self.text) - 1)
        self._emit(ready)

    def fail(self, message: str) -> None:
        self.finish_reason = "error"
        self.sink("error", message)

    def _decode(self) -> None:
        with TOKENIZER_LOCK:
            self.text = self.served.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _finish(self, reason: str) -> None:
        if not self.stream and not self.stop_strings:
            self._decode()
        self._emit(len(self.text))
        self.finish_reason = reason
        self.sink("done", reason)

    def _emit(self, upto: int) -> None:
        if upto > self._sent:
            self.sink("text", self.text[self._sent : upto])
            self._sent = upto


@dataclass(eq=False)
class _Control:
    """Work that must run on the worker thread between batches (loading or deleting an adapter)."""

    fn: Callable[[], object]
    future: Future


class Scheduler:
    """Collects waiting jobs into batches, across adapters, and runs them on one worker thread.

    A job waits in a bounded queue (`submit` raises QueueFull when it is full). When the worker is free it takes
    the oldest job and every later one that decodes the same way, up to `max_batch_size`; from idle it first waits
    `collect_s` so that requests arriving together share a batch. `mix_adapters=False` batches one adapter at a
    time (the comparison the benchmark makes). Control work (`call`) runs in order with the jobs queued before it.
    """

    def __init__(self, pool: ModelPool, *, max_batch_size: int = 32, queue_size: int = 256, collect_s: float = 0.01,
                 mix_adapters: bool = True):
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.queue_size = queue_size
        self.collect_s = collect_s
        self.mix_adapters = mix_adapters
        self.batches: deque[list[str]] = deque(maxlen=1000)  # the models of recent batches, for tests and benchmarks
        self._queue: deque[Job | _Control] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._paused = False
        self._thread = threading.Thread(target=self._run, name="loraft-serve-worker", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    @property
    def waiting(self) -> int:
        return sum(isinstance(item, Job) for item in self._queue)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if self.waiting >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later")
            self._queue.append(job)
            self._cond.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the worker thread after the jobs queued so far; its result or exception lands in the Future."""
        future: Future = Future()
        with self._cond:
            self._queue.append(_Control(fn, future))
            self._cond.notify()
        return future

    def pause(self, paused: bool = True) -> None:
        """Hold new batches (tests use it to fill the queue deterministically)."""
        with self._cond:
            self._paused = paused
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Finish every queued job, then stop the worker."""
        with self._cond:
            self._closing = True
            self._paused = False
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                idle = not self._queue
                while (not self._queue or self._paused) and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                if idle and isinstance(self._queue[0], Job):
                    deadline = time.monotonic() + self.collect_s
                    while len(self._queue) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                head = self._queue[0]
                if isinstance(head, _Control):
                    self._queue.popleft()
                    batch = None
                else:
                    batch = self._take_batch()
            if batch is None:
                _run_control(head)
            elif batch:
                self.batches.append([job.served.name for job in batch])
                run_batch(self.pool.model, batch)

    def _take_batch(self) -> list[Job]:
        """The oldest job and the later ones that can share its batch (stopping at the first control item)."""
        head = self._queue[0]
        key = self._key(head)
        batch, rest = [], deque()
        blocked = False
        for item in self._queue:
            if isinstance(item, _Control):
                blocked = True
            if not blocked and isinstance(item, Job) and item.cancelled:
                continue
            if not blocked and len(batch) < self.max_batch_size and self._key(item) == key:
                batch.append(item)
            else:
                rest.append(item)
        self._queue = rest
        return batch

    def _key(self, job: Job):
        sampling = job.sampling.normalized()
        return sampling if self.mix_adapters else (sampling, job.served.adapter)


def _run_control(item: _Control) -> None:
    try:
        item.future.set_result(item.fn())
    except BaseException as exc:  # handed to the caller through the Future
        item.future.set_exception(exc)


def run_batch(model, jobs: list[Job]) -> None:
    """One `generate` call for jobs of possibly different adapters; each job receives its own tokens."""
    try:
        with torch.no_grad():
            _generate(model, jobs)
    except Exception as exc:  # a failed batch fails its requests, never the server
        message = f"generation failed: {type(exc).__name__}: {exc}"
        for job in jobs:
            if not job.done:
                job.fail(message)
    for job in jobs:  # a row cut off by the batch's end (cannot happen with a correct max_new_tokens) still ends
        if not job.done:
            job._finish("length")


def _generate(model, jobs: list[Job]) -> None:
    device = next(model.parameters()).device
    width = max(len(job.prompt_ids) for job in jobs)
    pad = jobs[0].served.tokenizer.pad_token_id or 0  # any id: padded positions are masked out
    input_ids = torch.full((len(jobs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(jobs), width), dtype=torch.long)
    for row, job in enumerate(jobs):
        input_ids[row, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
        attention[row, width - len(job.prompt_ids) :] = 1
    sampling = jobs[0].sampling.normalized()
    options = {} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    config = GenerationConfig(
        max_new_tokens=max(job.max_new_tokens for job in jobs), do_sample=not sampling.greedy, repetition_penalty=1.0,
        eos_token_id=[], pad_token_id=pad, **options,
    )

    class RowStops(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            last = ids[:, -1].tolist()
            for row, job in enumerate(jobs):
                if not job.done:
                    job.accept(last[row])
            return torch.tensor([job.done for job in jobs], device=ids.device)

    with _adapters_for(model, [job.served.adapter for job in jobs]) as extra:
        model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config,
            stopping_criteria=StoppingCriteriaList([RowStops()]), **extra,
        )


@contextmanager
def _adapters_for(model, names: list[str]):
    """PEFT's per-row adapters for a mixed batch; for a batch of one adapter (or none), the plain path.

    The plain path is the one `loraft generate` takes, and it skips the mixed path's per-adapter row gather and
    scatter (`result[rows] += ...`), which on CPU costs about a third as much as the base layer itself.
    """
    if not hasattr(model, "peft_config"):
        yield {}
    elif len(set(names)) > 1:
        yield {"adapter_names": names}
    elif names[0] == BASE_ROW:
        with model.disable_adapter():
            yield {}
    else:
        model.set_adapter(names[0])
        yield {}
