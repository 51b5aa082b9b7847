"""The HTTP routes: OpenAI's /v1 API plus /health and /metrics.

Request path: validate the body (schemas), build SamplingParams and the request's partial
SpecConfig (engine.params rules; the only validation they get), submit an AddRequest to the
engine queue, wait for Admitted (prompt length and the spec the engine merged), then either
collect the TokenEvents into one body or stream them as SSE. A client that goes away gets its
request aborted in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from engine.events import AddRequest, EngineReady, Prompt, TokenEvent, TokenLogprob
from engine.params import SamplingParams, SpecConfig
from server.auth import require_api_key
from server.engine_client import READY, EngineClient, RequestHandle
from server.errors import APIError
from server.metrics import CONTENT_TYPE
from server.protocol import ResponseBuilder, sse, stats_fields
from server.schemas import BaseCompletionRequest, ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)
DISCONNECT_POLL_SECONDS = 0.5

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
ops = APIRouter()


def _client(request: Request) -> EngineClient:
    return request.app.state.engine


def served_model_name(request: Request) -> str | None:
    info = _client(request).info
    return request.app.state.settings.served_model_name or (info.model if info else None)


def _validation_error(exc: ValidationError, prefix: str | None = None) -> APIError:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    param = ".".join(p for p in (prefix, loc) if p) or prefix
    return APIError(400, f"{param}: {first.get('msg', 'invalid value')}" if param else str(exc), param,
                    "invalid_request")


def _prepare(request: Request, body: BaseCompletionRequest) -> tuple[SamplingParams, SpecConfig | None]:
    """Checks shared by both routes; returns the validated sampling and the request's partial spec."""
    for param, why in body.unsupported():
        raise APIError(400, why, param, "unsupported_parameter")
    _client(request).check_ready()
    name = served_model_name(request)
    if body.model != name:
        raise APIError(404, f"The model '{body.model}' does not exist; this server serves '{name}'", "model",
                       "model_not_found")
    try:
        sampling = body.to_sampling()
    except ValidationError as exc:
        raise _validation_error(exc) from None
    try:
        spec = body.to_spec()
    except ValidationError as exc:
        raise _validation_error(exc, "specdec") from None
    return sampling, spec


async def _run(request: Request, body: BaseCompletionRequest, kind: str, prompt: Prompt) -> Response:
    sampling, spec = _prepare(request, body)
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    handle = _client(request).submit(AddRequest(request_id, prompt, sampling, spec))
    watcher = asyncio.ensure_future(_abort_on_disconnect(request, handle))
    try:
        admitted = await handle.admitted()  # 4xx from the engine surface here, before any stream starts
        builder = ResponseBuilder(kind, request_id, body.model, admitted.spec)
        if not body.stream:
            return await _collect(handle, builder, admitted.prompt_tokens)
    except BaseException:
        handle.abort()
        raise
    finally:
        watcher.cancel()  # a stream's disconnects are seen by Starlette, which cancels `_stream`
    return StreamingResponse(
        _stream(handle, builder, admitted.prompt_tokens, body.include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _abort_on_disconnect(request: Request, handle: RequestHandle) -> None:
    """While a route waits on the engine, poll the connection; a gone client aborts the request."""
    while not handle.finished:
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        if await request.is_disconnected():
            log.info("client left; aborting %s", handle.request_id)
            handle.abort()
            return


async def _collect(handle: RequestHandle, builder: ResponseBuilder, prompt_tokens: int) -> Response:
    """Non-streaming: gather the events into one body."""
    parts: list[str] = []
    logprobs: list[TokenLogprob] | None = None  # stays None unless the request asked for logprobs
    while True:
        event = await handle.next_event()
        parts.append(event.text)
        if event.logprobs is not None:
            logprobs = (logprobs or []) + event.logprobs
        if event.finished:
            break
    _raise_for_final(event)
    return JSONResponse(builder.full("".join(parts), event.finish_reason, prompt_tokens, event.stats, logprobs))


def _raise_for_final(final: TokenEvent) -> None:
    reason = final.finish_reason
    if reason == "error":
        raise APIError(500, f"generation failed: {final.error}", None, "internal_error")
    if reason == "abort":
        raise APIError(503, "the request was cancelled (the server is shutting down)", None, "request_cancelled")


async def _stream(
    handle: RequestHandle, builder: ResponseBuilder, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """SSE: a role chunk, content chunks, a finish chunk, an optional usage chunk, [DONE].

    The stats (`metrics`, `specdec`) ride on the finish chunk and on the usage chunk.
    Starlette cancels this generator when the client disconnects; `finally` then aborts
    the request in the engine so its caches are freed.
    """
    try:
        if builder.kind == "chat":  # chat streams open with the assistant role, like OpenAI's
            yield sse(builder.chunk("", first=True, with_usage_key=include_usage))
        async for event in handle.events():
            if event.finished:
                reason = event.finish_reason
                if reason in ("error", "abort"):
                    _raise_for_final(event)
                chunk = builder.chunk(event.text or None, finish_reason=reason, with_usage_key=include_usage,
                                      logprobs=event.logprobs)
                chunk.update(stats_fields(event.stats, builder.spec))
                yield sse(chunk)
                if include_usage:
                    yield sse(builder.usage_chunk(prompt_tokens, event.stats))
            elif event.text or event.logprobs:  # tokens whose text is held back still carry their logprobs
                yield sse(builder.chunk(event.text, with_usage_key=include_usage, logprobs=event.logprobs))
        yield sse("[DONE]")
    except APIError as exc:
        yield sse(exc.body())
        yield sse("[DONE]")
    finally:
        handle.abort()  # no-op when the request already finished


@v1.post("/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    if not body.messages:
        raise APIError(400, "messages must contain at least one message", "messages", "invalid_request")
    return await _run(request, body, "chat", body.prompt())


@v1.post("/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    return await _run(request, body, "completion", body.prompt_value())


@v1.get("/models")
async def list_models(request: Request) -> dict:
    name = served_model_name(request)
    if name is None:
        raise _client(request).unavailable()
    card = {"id": name, "object": "model", "created": request.app.state.started, "owned_by": "specdecpp",
            **_engine_card(_client(request).info)}
    return {"object": "list", "data": [card]}


def _engine_card(info: EngineReady | None) -> dict:
    """What the engine says of itself; nulls before its first start (a --served-model-name answers earlier)."""
    if info is None:
        return {"max_model_len": None,
                "specdec": {"draft": None, "head": None, "heads": None, "default": {}, "scheduler": None}}
    return {"max_model_len": info.max_model_len,
            "specdec": {"draft": info.draft, "head": info.head, "heads": info.heads,
                        "default": info.default_spec.model_dump(), "scheduler": info.scheduler}}


@ops.get("/health")
async def health(request: Request) -> JSONResponse:
    client = _client(request)
    body = {"status": client.state, "restarts": client.restarts}
    if client.last_error and client.state != READY:
        body["error"] = client.last_error
    return JSONResponse(body, status_code=200 if client.state == READY else 503)


@ops.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

