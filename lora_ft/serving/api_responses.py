"""What `loraft serve` answers: OpenAI's response objects, built with the `openai` package's own types (as
`transformers serve` does) from generation jobs, whole or streamed as server-sent events.

Using the client library's types means what we send is what OpenAI clients parse; fields we never set are left
out (exclude_unset) rather than sent as null. One pitfall: OpenAI streams a completion's finish_reason as null
until the last chunk, which CompletionChoice's type does not allow, so those chunks are built unvalidated.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Sequence

from fastapi.responses import Response
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice, ChoiceDelta
from pydantic import BaseModel

from lora_ft.serving.batching import Job


def json_response(model: BaseModel) -> Response:
    return Response(model.model_dump_json(exclude_unset=True), media_type="application/json")


def usage(jobs: Sequence[Job]) -> CompletionUsage:
    prompt = sum(len(job.prompt_ids) for job in jobs)
    completion = sum(len(job.tokens) for job in jobs)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def chat_completion(job: Job, model: str) -> ChatCompletion:
    message = ChatCompletionMessage(role="assistant", content=job.text)
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion", created=int(time.time()), model=model,
        choices=[Choice(index=0, message=message, finish_reason=job.finish_reason)], usage=usage([job]),
    )


def completion(jobs: Sequence[Job], model: str) -> Completion:
    choices = [CompletionChoice(index=i, text=job.text, finish_reason=job.finish_reason, logprobs=None) for i, job in enumerate(jobs)]
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=model, choices=choices,
        usage=usage(jobs),
    )


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    data = payload.model_dump_json(exclude_unset=True) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def chat_chunks(model: str):
    """chunk(delta, finish_reason, usage=None) -> the next ChatCompletionChunk of one streamed answer (one id; the
    first chunk carries the role)."""
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    first = [True]

    def chunk(delta, finish_reason, usage=None):
        head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
        if usage is not None:
            return ChatCompletionChunk(**head, choices=[], usage=usage)
        content = {"content": delta} if delta is not None else {}
        if first[0]:
            content["role"], first[0] = "assistant", False
        return ChatCompletionChunk(**head, choices=[ChunkChoice(index=0, delta=ChoiceDelta(**content), finish_reason=finish_reason)])

    return chunk


def completion_chunks(model: str):
    """chunk(delta, finish_reason, usage=None) -> the next Completion chunk of one streamed answer."""
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta, finish_reason, usage=None):
        head = {"id": ident, "object": "text_completion", "created": created, "model": model}
        if usage is not None:
            return Completion(**head, choices=[], usage=usage)
        # OpenAI streams finish_reason null until the last chunk, which CompletionChoice's type does not allow.
        choice = CompletionChoice.model_construct(index=0, text=delta or "", finish_reason=finish_reason, logprobs=None)
        return Completion.model_construct(**head, choices=[choice])

    return chunk
