"""`loraft serve`: an OpenAI-compatible HTTP API over one base model and many LoRA adapters.

Reads run folders (adapter, tokenizer and chat template as trained, stop ids, base fingerprint); writes
nothing. The engine (loading, batching across adapters, isolation) is `serving/batching.py`; this module is the
HTTP side, on the stack `transformers serve` uses: FastAPI + uvicorn, with the `openai` package's own response
types so that what we send is what OpenAI clients parse (`serving/api_responses.py`); what a request may say,
and how a bad one is refused, is `serving/api_requests.py`. `model` in a request names an adapter; the base's own name means no adapter. Pitfalls guarded here: every error is a JSON body in OpenAI's error shape and the
server keeps serving; the queue is bounded (503 when full); SIGTERM lets the requests in flight finish and
exits 0 (uvicorn re-raises the signal it caught after its graceful shutdown, so our own handler absorbs it).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from lora_ft.errors import LoraftError
from lora_ft.serving.api_requests import (
    APIError, ChatRequest, CompletionRequest, GenerateRequest, LoadLoraRequest, UnloadLoraRequest, parse_body,
)
from lora_ft.artifacts.adapter_run import AdapterRun, check_adapter_name
from lora_ft.serving.api_responses import (
    chat_chunks, chat_completion, completion, completion_chunks, json_response, sse, usage,
)
from lora_ft.serving.batching import Job, ModelPool, QueueFull, Scheduler, ServedModel

LOG = logging.getLogger("loraft.serve")


@dataclass(frozen=True)
class ServeSettings:
    """Server limits and switches (the CLI's flags)."""

    max_tokens: int = 512  # the most a request may ask for, and what it gets when it does not say (or the context left)
    max_batch_size: int = 32
    queue_size: int = 256
    api_key: str | None = None
    allow_runtime_lora: bool = False
    max_body_bytes: int = 1 << 20  # a request body above this is refused (413) before it is parsed
    max_json_depth: int = 32  # JSON nested deeper is refused (400) before it is parsed

    def __post_init__(self):
        for name in ("max_tokens", "max_batch_size", "queue_size", "max_body_bytes", "max_json_depth"):
            if getattr(self, name) < 1:
                raise LoraftError(f"--{name.replace('_', '-')}: must be at least 1")

    def __repr__(self) -> str:  # never show the key
        return f"ServeSettings(max_tokens={self.max_tokens}, max_batch_size={self.max_batch_size}, queue_size={self.queue_size}, api_key={'set' if self.api_key else None}, allow_runtime_lora={self.allow_runtime_lora})"


def parse_adapters(values: Sequence[str]) -> dict[str, Path]:
    """--adapter NAME=RUN_DIR (or RUN_DIR, named after its folder) -> {name: folder}."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name, value
        if not name or not path:
            raise LoraftError(f"--adapter: expected NAME=RUN_DIR, got {value!r}")
        check_adapter_name(name, "--adapter")
        if name in adapters:
            raise LoraftError(f"--adapter: the name {name!r} is given twice; give each adapter its own name")
        adapters[name] = Path(path)
    return adapters


def serve(adapters: dict[str, Path], *, base: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          settings: ServeSettings = ServeSettings(), announce=print, force: bool = False) -> None:
    """Load everything, then serve until Ctrl-C or SIGTERM; the requests in flight finish first."""
    _check_port_free(host, port)
    if sys.stderr.isatty():  # progress on a terminal only: piped, a refusal stays one line
        announce(f"loading {base or 'the base'} with {len(adapters)} adapter(s): {', '.join(adapters) or 'none'} ...")
    pool = ModelPool.load(adapters, base, force=force)
    scheduler = Scheduler(pool, max_batch_size=settings.max_batch_size, queue_size=settings.queue_size).start()
    server = uvicorn.Server(_uvicorn_config(build_app(pool, scheduler, settings), host, port))
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        announce(f"warning: serving on {host} without --api-key: anyone who can reach this port can use it")
    announce(f"serving {', '.join(pool.names)} at http://{host}:{port}/v1 (OpenAI API); Ctrl-C or SIGTERM stops after the requests in flight")
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        scheduler.close()
        announce(f"stopped serving {', '.join(pool.names)} at http://{host}:{port}/v1")


def _uvicorn_config(app, host: str, port: int):
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LoraftError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None


class BackgroundServer:
    """The same server in a thread of this process, on a free port (tests and benchmarks)."""

    def __init__(self, pool: ModelPool, settings: ServeSettings = ServeSettings(), *, host: str = "127.0.0.1",
                 mix_adapters: bool = True):
        self.scheduler = Scheduler(pool, max_batch_size=settings.max_batch_size, queue_size=settings.queue_size,
                                   mix_adapters=mix_adapters).start()
        self.server = uvicorn.Server(_uvicorn_config(build_app(pool, self.scheduler, settings), host, 0))
        self._thread = threading.Thread(target=self.server.run, name="loraft-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self.scheduler.close(30)

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# The app


def build_app(pool: ModelPool, scheduler: Scheduler, settings: ServeSettings):
    """The FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, and the runtime adapter routes."""
    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(scheduler.close)  # uvicorn has already waited for the requests in flight

    app = FastAPI(title="loraft serve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(_ClientGone)
    async def client_gone(request, exc):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        trace = uuid.uuid4().hex[:16]  # our bug: the client gets the id, the log gets the traceback
        LOG.error("internal error %s on %s %s", trace, request.method, request.url.path, exc_info=exc)
        return APIError(500, f"internal error (trace id {trace}); the server log has the details", code="internal_error").response()

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send Authorization: Bearer <key>", code="invalid_api_key")

    guarded = [Depends(authorize)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=guarded)
    async def list_models():
        return {"object": "list", "data": [_model_card(pool, name) for name in pool.names]}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        body = await _parse(request, ChatRequest, settings)
        served = _served(pool, body.model)
        if not served.has_template:
            raise APIError(400, f"model {served.name!r} has no chat template; use /v1/completions", param="model")
        messages = [m.as_dict() for m in body.messages]
        _cannot_fit(pool, served, sum(len(m["content"]) for m in messages), "messages")
        prompt = await _tokenize(served.render_chat, messages)
        limit = _max_new_tokens(pool, settings, body.max_completion_tokens or body.max_tokens, len(prompt))
        job, channel = _submit(scheduler, served, prompt, limit, body)
        if body.stream:
            return StreamingResponse(_stream(job, channel, body, chat_chunks(body.model)), media_type="text/event-stream")
        await _finished(request, job, channel)
        return json_response(chat_completion(job, body.model))

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest, settings)
        served = _served(pool, body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise APIError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
        if body.stream and len(texts) > 1:
            raise APIError(400, "prompt: streaming takes one prompt per request", param="prompt")
        _cannot_fit(pool, served, max(len(text) for text in texts), "prompt")
        prompts = [await _tokenize(served.render_text, text) for text in texts]
        limits = [_max_new_tokens(pool, settings, body.max_tokens, len(ids)) for ids in prompts]
        submitted = []
        try:
            for ids, limit in zip(prompts, limits):
                submitted.append(_submit(scheduler, served, ids, limit, body))
        except APIError:
            for job, _ in submitted:
                job.cancelled = True
            raise
        if body.stream:
            job, channel = submitted[0]
            return StreamingResponse(_stream(job, channel, body, completion_chunks(body.model)), media_type="text/event-stream")
        jobs = [job for job, _ in submitted]
        for job, channel in submitted:
            await _finished(request, job, channel, jobs)
        return json_response(completion(jobs, body.model))

    @app.post("/v1/load_lora_adapter", dependencies=guarded)
    async def load_lora_adapter(request: Request):
        _runtime_lora_enabled(settings)
        body = await _parse(request, LoadLoraRequest, settings)
        try:  # every check before the model is touched; the load itself is all or nothing (ModelPool.attach)
            check_adapter_name(body.lora_name)
            run = await asyncio.to_thread(AdapterRun.load, body.lora_path)
            await asyncio.wrap_future(scheduler.call(lambda: (pool.check(body.lora_name, run), pool.attach(body.lora_name, run))))
        except LoraftError as exc:
            raise APIError(400, str(exc).replace("--adapter: ", "lora_path: "), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=guarded)
    async def unload_lora_adapter(request: Request):
        _runtime_lora_enabled(settings)
        body = await _parse(request, UnloadLoraRequest, settings)
        if pool.adapters.pop(body.lora_name, None) is None:  # new requests for it get 404 from now on
            raise APIError(404, f"the LoRA adapter {body.lora_name!r} is not loaded", param="lora_name", code="model_not_found")
        await asyncio.wrap_future(scheduler.call(lambda: pool.detach(body.lora_name)))  # after the requests queued for it
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _runtime_lora_enabled(settings: ServeSettings) -> None:
    if not settings.allow_runtime_lora:
        raise APIError(404, "loading and unloading adapters at run time is off; start loraft serve with --allow-runtime-lora")


async def _parse(request, schema: type[BaseModel], settings: ServeSettings):
    return await parse_body(request, schema, max_bytes=settings.max_body_bytes, max_depth=settings.max_json_depth)


_LONGEST_TOKEN: dict[int, int] = {}


def _cannot_fit(pool: ModelPool, served: ServedModel, chars: int, param: str) -> None:
    """Refuse, without tokenizing it, a prompt too long for the context whatever it says: no token covers more
    characters than the longest string in the vocabulary, so `chars` need at least chars / longest tokens.
    (Tokenizing holds the tokenizer lock, which every streamed answer's decoding waits on.)"""
    key = id(served.tokenizer)
    if key not in _LONGEST_TOKEN:
        _LONGEST_TOKEN[key] = max(map(len, served.tokenizer.get_vocab()), default=1)
    least = chars // _LONGEST_TOKEN[key]
    if least > pool.context_length:
        raise APIError(
            400, f"this model's maximum context length is {pool.context_length} tokens; the prompt's {chars} characters "
            f"need at least {least}: shorten the prompt", param=param, code="context_length_exceeded",
        )


async def _tokenize(render, value) -> list[int]:
    """Prompt ids, built on a worker thread (a long prompt never stalls the event loop); a conversation the chat
    template refuses is the client's mistake (400)."""
    try:
        return await asyncio.to_thread(render, value)
    except TemplateError as exc:
        raise APIError(400, f"messages: the chat template refuses this conversation: {exc}", param="messages") from None
    except LoraftError as exc:  # the conversation format's own refusal (e.g. the template raised)
        raise APIError(400, str(exc), param="messages") from None
    except UnicodeError as exc:
        raise APIError(400, f"the text cannot be encoded: {exc}") from None


def _served(pool: ModelPool, name: str) -> ServedModel:
    served = pool.get(name)
    if served is None:
        raise APIError(404, f"the model {name!r} does not exist; this server has {', '.join(pool.names)}", param="model",
                        code="model_not_found")
    return served


def _max_new_tokens(pool: ModelPool, settings: ServeSettings, asked: int | None, prompt_tokens: int) -> int:
    if prompt_tokens == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    if asked is not None and asked > settings.max_tokens:
        raise APIError(400, f"max_tokens: {asked} is more than this server allows ({settings.max_tokens}, --max-tokens)",
                        param="max_tokens")
    limit = min(settings.max_tokens, max(pool.context_length - prompt_tokens, 1)) if asked is None else asked
    if prompt_tokens + limit > pool.context_length:
        raise APIError(
            400, f"this model's maximum context length is {pool.context_length} tokens; the request needs {prompt_tokens + limit} "
            f"({prompt_tokens} in the prompt, {limit} to generate): shorten the prompt or lower max_tokens",
            param="max_tokens", code="context_length_exceeded",
        )
    return limit


class _Channel:
    """Events from the worker thread, delivered to the request's event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))


def _submit(scheduler: Scheduler, served: ServedModel, prompt: list[int], limit: int, body: GenerateRequest):
    channel = _Channel()
    job = Job(served, prompt, limit, body.sampling(), body.stop_strings(), channel, stream=body.stream)
    try:
        scheduler.submit(job)
    except QueueFull as exc:
        raise APIError(503, str(exc), code="queue_full") from None
    return job, channel


async def _events(job: Job, channel: _Channel):
    """Yield the job's text deltas; end when it is done; a failed generation raises APIError(500)."""
    try:
        while True:
            kind, value = await channel.queue.get()
            if kind == "text":
                yield value
            elif kind == "done":
                return
            else:
                raise APIError(500, str(value))
    finally:
        if job.finish_reason is None:
            job.cancelled = True  # the client went away: stop generating for it


async def _finished(request, job: Job, channel: _Channel, jobs: Sequence[Job] = ()) -> None:
    """Wait for `job` of a non-streamed answer; when the client hangs up first, cancel every job of its request."""
    jobs = list(jobs) or [job]
    waiting = asyncio.ensure_future(_drain(job, channel))
    try:
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.25)
            if not waiting.done() and await request.is_disconnected():
                for job in jobs:
                    job.cancelled = True
                waiting.cancel()
                raise _ClientGone()
        waiting.result()
    finally:
        if not waiting.done():
            waiting.cancel()


async def _drain(job: Job, channel: _Channel) -> None:
    async for _ in _events(job, channel):
        pass


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready; its generation was cancelled."""


async def _stream(job: Job, channel: _Channel, body: GenerateRequest, chunk):
    """Server-sent events: chunk(delta, finish_reason) for each piece, the usage chunk if asked, then [DONE]."""
    try:
        async for delta in _events(job, channel):
            yield sse(chunk(delta, None))
        yield sse(chunk(None, job.finish_reason))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse(chunk(None, None, usage=usage([job])))
    except APIError as exc:  # the status line is already sent: the error travels as an event
        yield sse({"error": {"message": exc.message, "type": "server_error", "param": None, "code": None}})
    yield "data: [DONE]\n\n"


def _model_card(pool: ModelPool, name: str) -> dict:
    served = pool.get(name)
    adapter = served is not pool.base
    return {
        "id": name, "object": "model", "created": 0, "owned_by": "loraft",
        "root": str(served.path) if adapter else name, "parent": pool.base.name if adapter else None,
    }
