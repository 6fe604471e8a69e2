"""What a request to `loraft serve` may say, and how one that says anything else is refused.

The request bodies are the subset of OpenAI's API (and vLLM's runtime-adapter routes) that we support, as strict
pydantic models: an unknown field is a 400 naming it rather than a setting silently ignored. A body is read at
bounded cost before it is parsed (its size, 413; its JSON nesting depth; text that is not Unicode), and every
refusal is an `APIError`, answered in OpenAI's error shape so that OpenAI clients raise their own exception.
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_ft.serving.batching import Sampling


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ---------------------------------------------------------------------------------------------
# Requests (what OpenAI's API accepts and we support; anything else is a 400 naming the field)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _TextPart(_Strict):
    type: Literal["text"]
    text: str


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class _StreamOptions(_Strict):
    include_usage: bool = False


class GenerateRequest(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, description="up to 4 strings; generation ends before the first one")
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: give at most 4 non-empty strings", param="stop")
        return tuple(stops)

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p)


class ChatRequest(GenerateRequest):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(GenerateRequest):
    prompt: str | list[str]


class LoadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's body may carry it; names are what we go by


# ---------------------------------------------------------------------------------------------
# Reading a body


async def parse_body(request, schema: type[BaseModel], *, max_bytes: int, max_depth: int):
    """The body as `schema`, its cost bounded before any work: size (413), nesting depth, text that is not UTF-8."""
    raw = await _body(request, max_bytes)
    depth = _json_depth(raw)
    if depth > max_depth:
        raise APIError(400, f"the body nests JSON {depth} levels deep; at most {max_depth} are accepted")
    try:
        data = json.loads(raw or b"null")
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\\ud800) is not text
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    except UnicodeEncodeError:
        raise APIError(400, "the body holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text; send valid Unicode") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        message = "unknown or unsupported field" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise APIError(400, f"{where}: {message}{more}", param=where) from None


async def _body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the body is {int(declared)} bytes; this server accepts at most {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the body is over {limit} bytes; this server accepts at most {limit}", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_depth(raw: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text (outside strings), read without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest
