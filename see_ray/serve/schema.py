"""The OpenAI-compatible HTTP schema of the SEE endpoint: requests, responses, errors.

Endpoints (served by the dispatcher, ``ingress.py``; the FastAPI application at the end of this file):

- ``POST /v1/completions``        OpenAI completions (``prompt``: a string, or a list of strings)
- ``POST /v1/chat/completions``   OpenAI chat completions
- ``GET  /v1/models``             the system model (SEE routing), ``base``, and every expert
- ``GET  /v1/experts``            the expert sequence in the order it is walked, with state
- ``POST /v1/route``              routing decisions only, no generation
- ``GET  /healthz``               liveness and the sequence size

``model`` selects the path: the system name (``see`` by default) routes by SEE; ``base`` forces the base
model; an expert's name forces that expert (it still reports its p(ACCEPT), but answers regardless).

How a request becomes a SEE query: clients send raw text, so a completion prompt is the query's *input*
(no task definition: SEE's input-only mode). In chat, the last ``user`` message is the input and the last
``system`` message, if any, is used as the task definition (the instruction SEE's prompt template puts
before the input). Earlier turns are not part of the query (SEE experts are single-turn task solvers).

Decoding is greedy: ``temperature``/``top_p``/``seed`` are accepted for compatibility and ignored; ``n``
must be 1; ``stop`` strings cut the answer (and end a stream).

Streaming (``stream: true``, server-sent events in OpenAI's chunk format): the routing decisions are made
first (the walk asks the experts for decisions only), then the accepting expert (or the base) generates and
every token's text is sent as it is produced. The pieces concatenate to exactly the non-streamed answer; the
last chunk before ``[DONE]`` carries ``finish_reason``, ``usage`` and the routing trace.

Routing trace (extension field ``see_routing`` on every completion object and on the final stream chunk)::

    {"expert": "shout" | "base", "hops": 2, "mode": "sequential",
     "asks": [{"expert": "antonyms", "p_accept": 0.01, "threshold": 0.6, "accepted": false, "ms": 3.1}, ...],
     "hop_ms": [3.1, 5.0], "total_ms": 9.4, "forced": false}

``asks`` lists the experts asked in sequence order up to (and including) the one that accepted — the same
list in sequential and concurrent mode; ``ms`` is the time of that hop as seen by the dispatcher.

Errors use OpenAI's format ``{"error": {"message", "type", "param", "code"}}``: 400 malformed JSON, an
unknown or invalid model name, or a prompt over ``limits.max_prompt_chars`` (``prompt_too_long``); 401 a
missing or wrong API key when one is configured (``auth``; ``/healthz`` stays open for load balancers and
liveness probes, and tells nothing but the sequence size); 413 a body over ``limits.max_body_bytes``; 422 a
field that fails validation (empty prompt, wrong type, max_tokens out of range); 429 + ``Retry-After`` when a
client has ``limits.max_concurrent_per_client`` requests in flight; 503 + ``Retry-After`` when no deployment
can take the request. Bad input never yields a 500.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from see_ray.core.prompts import Query
from see_ray.config.serve import LimitSettings

log = logging.getLogger(__name__)

TRACE_FIELD = "see_routing"


# -- errors -----------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error that becomes an OpenAI-format JSON response."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unavailable(message: str, retry_after_s: int) -> APIError:
    return APIError(503, message, "service_unavailable", None, "unavailable", {"Retry-After": str(retry_after_s)})


def too_many_requests(limit: int, retry_after_s: int) -> APIError:
    return APIError(429, f"too many concurrent requests from this client (limit {limit}); retry later",
                    "rate_limit_error", None, "rate_limit_exceeded", {"Retry-After": str(retry_after_s)})


def unauthorized() -> APIError:
    # The message never echoes what the client sent: a wrong key must not end up in logs or responses.
    return APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "authentication_error",
                    None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def body_too_large(n: int | str, limit: int) -> APIError:
    return APIError(413, f"request body of {n} bytes exceeds {limit}", code="body_too_large")


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` (from the Content-Length header, or
    while streaming a chunked body), so an oversized upload is never held in memory whole."""
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > limit:
        raise body_too_large(n, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(f"more than {limit}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error, named by its field path, as a 422."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p not in ("body",)) or None
    msg = err["msg"]
    if len(e.errors()) > 1:
        msg += f" (and {len(e.errors()) - 1} more problem(s))"
    return APIError(422, f"{loc}: {msg}" if loc else msg, "invalid_request_error", loc, "invalid_value")


def parse_body(raw: bytes, model: type[BaseModel], limits: LimitSettings):
    """Raw body -> validated request model, or APIError (413 / 400 / 422)."""
    if len(raw) > limits.max_body_bytes:
        raise body_too_large(len(raw), limits.max_body_bytes)
    if not raw.strip():
        raise APIError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    req.check_limits(limits)
    return req


# -- requests ---------------------------------------------------------------------------------------------
class _Req(BaseModel):
    # Unknown OpenAI fields (logit_bias, presence_penalty, ...) are accepted and ignored, as most
    # OpenAI-compatible servers do; the fields below are type-checked.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="System name (SEE routing), 'base', or an expert's name.")
    max_tokens: int | None = Field(None, description="Tokens to generate (1..limits.max_tokens).")
    temperature: float | None = Field(None, ge=0, le=2, description="Accepted and ignored: decoding is greedy.")
    top_p: float | None = Field(None, ge=0, le=1, description="Accepted and ignored.")
    n: int = Field(1, description="Choices per prompt; only 1 is supported.")
    stream: bool = Field(False, description="Server-sent events, OpenAI chunk format.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the answer.")
    seed: int | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported (decoding is greedy)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def check_limits(self, limits: LimitSettings) -> None:
        if self.max_tokens is not None and not 1 <= self.max_tokens <= limits.max_tokens:
            raise APIError(
                422, f"max_tokens must be between 1 and {limits.max_tokens}, got {self.max_tokens}",
                param="max_tokens", code="invalid_value",
            )

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]


class CompletionRequest(_Req):
    prompt: str | list[str] = Field(description="The query text (input-only SEE query), or a list of them.")
    echo: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def check_limits(self, limits: LimitSettings) -> None:
        super().check_limits(limits)
        ps = self.prompts()
        if not ps:
            raise APIError(422, "prompt must not be an empty list", param="prompt", code="invalid_value")
        if len(ps) > 16:
            raise APIError(422, "at most 16 prompts per request", param="prompt", code="invalid_value")
        if self.stream and len(ps) > 1:
            raise APIError(422, "stream=true takes a single prompt", param="prompt", code="invalid_value")
        for p in ps:
            if not p.strip():
                raise APIError(422, "prompt must not be empty", param="prompt", code="invalid_value")
            if len(p) > limits.max_prompt_chars:
                raise APIError(
                    400, f"prompt of {len(p)} characters exceeds {limits.max_prompt_chars}", param="prompt",
                    code="prompt_too_long",
                )

    def queries(self) -> list[Query]:
        return [Query(p) for p in self.prompts()]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        # OpenAI content parts: only text parts are supported.
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(422, "only text content parts are supported", param="messages", code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(description="The conversation; the last user message is the query.")

    def check_limits(self, limits: LimitSettings) -> None:
        super().check_limits(limits)
        if not self.messages:
            raise APIError(422, "messages must not be empty", param="messages", code="invalid_value")
        if len(self.messages) > limits.max_messages:
            raise APIError(422, f"at most {limits.max_messages} messages", param="messages", code="invalid_value")
        total = sum(len(m.text()) for m in self.messages)
        if total > limits.max_prompt_chars:
            raise APIError(
                400, f"messages of {total} characters exceed {limits.max_prompt_chars}", param="messages",
                code="prompt_too_long",
            )
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise APIError(422, "messages must contain a non-empty user message", param="messages", code="invalid_value")

    def query(self) -> Query:
        user = next(m for m in reversed(self.messages) if m.role == "user" and m.text().strip())
        system = next((m for m in reversed(self.messages) if m.role in ("system", "developer")), None)
        definition = system.text().strip() if system is not None else None
        return Query(user.text(), definition or None)


class RouteRequest(BaseModel):
    """``POST /v1/route``: decisions only. Either ``prompt`` (input-only) or chat ``messages``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    def check_limits(self, limits: LimitSettings) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(422, "give exactly one of prompt or messages", param="prompt", code="invalid_value")
        if self.prompt is not None:
            CompletionRequest(model="x", prompt=self.prompt).check_limits(limits)
        else:
            ChatRequest(model="x", messages=self.messages).check_limits(limits)

    def query(self) -> Query:
        if self.prompt is not None:
            return Query(self.prompt)
        return ChatRequest(model="x", messages=self.messages).query()


# -- responses --------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(model: str, choices: list[dict], usage_: dict, trace: dict | list) -> dict:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
        TRACE_FIELD: trace,
    }


def chat_response(model: str, text: str, finish: str, usage_: dict, trace: dict) -> dict:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage_,
        TRACE_FIELD: trace,
    }


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class StopScanner:
    """Applies ``stop`` strings to a stream of text pieces exactly as ``apply_stop`` does to the whole text.

    ``feed(piece)`` returns the text that may be sent now and whether a stop string was hit (then nothing more
    is sent). A tail that could still become the start of a stop string is held back until the next piece
    settles it; ``flush()`` returns it at the end.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything received
        self.sent = 0  # characters of it already released
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.text += piece
        cut, hit = apply_stop(self.text, self.stops)
        if hit:
            self.stopped = True
            return self._release(len(cut)), True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - hold), False

    def flush(self) -> str:
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.sent : max(upto, self.sent)]
        self.sent = max(upto, self.sent)
        return out


# -- the FastAPI application ------------------------------------------------------------------------------
# The dispatcher (ingress.py) adds its endpoints to it; here: the OpenAPI document and the error responses.
fastapi_app = FastAPI(
    title="see-ray",
    description="SEE (Sequential Ensemble of Experts) behind an OpenAI-compatible API. See see_ray/serve/schema.py.",
)


# The POST endpoints read the raw body themselves (size limit before parsing, OpenAI-format errors), so FastAPI
# cannot see their schemas: they are added to the OpenAPI document here (clients and the fuzz test use it).
_REQUEST_BODIES = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatRequest,
    "/v1/route": RouteRequest,
}


def _openapi() -> dict:
    if fastapi_app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=fastapi_app.title, version=fastapi_app.version,
                           description=fastapi_app.description, routes=fastapi_app.routes)
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        for path, model in _REQUEST_BODIES.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            spec["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        fastapi_app.openapi_schema = spec
    return fastapi_app.openapi_schema


fastapi_app.openapi = _openapi


@fastapi_app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@fastapi_app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):  # a bug, never bad input
    log.exception("internal error")
    err = APIError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error")
    return JSONResponse(err.body(), status_code=500)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    err = APIError(422, f"invalid request: {exc.errors()[:1]}", code="invalid_value")
    return JSONResponse(err.body(), status_code=422)


@fastapi_app.exception_handler(404)
async def _not_found(request: Request, exc):
    err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
    return JSONResponse(err.body(), status_code=404)


@fastapi_app.exception_handler(405)
async def _bad_method(request: Request, exc):
    err = APIError(405, f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed")
    return JSONResponse(err.body(), status_code=405)
