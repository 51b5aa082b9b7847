"""The HTTP routes: OpenAI's /v1 API plus /health, /metrics and /version.

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
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from engine.events import AddRequest, EngineReady, Prompt, TokenEvent, TokenLogprob
from engine.params import SamplingParams, SpecConfig
from engine.stats import RequestStats
from server.auth import require_api_key
from server.engine_client import READY, EngineClient, RequestHandle
from server.errors import APIError
from server.metrics import CONTENT_TYPE
from server.middleware import request_id_of
from server.protocol import ResponseBuilder, merged_stats, sse, stats_fields
from server.schemas import BaseCompletionRequest, ChatCompletionRequest, CompletionRequest
from specdecpp import __version__

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
        raise _as_sent(_validation_error(exc), body) from None
    try:
        spec = body.to_spec()
    except ValidationError as exc:
        raise _validation_error(exc, "specdec") from None
    return sampling, spec


def _as_sent(error: APIError, body: BaseCompletionRequest) -> APIError:
    """An error about max_tokens names the field the client sent (chat's max_completion_tokens, say)."""
    sent = body.max_tokens_param()
    if error.param == "max_tokens" and sent != "max_tokens":
        error.param, error.message = sent, error.message.replace("max_tokens", sent)
    return error


async def _run(request: Request, body: BaseCompletionRequest, kind: str, prompts: list[Prompt]) -> Response:
    """Serve one request of one or more prompts (one choice each, in order)."""
    sampling, spec = _prepare(request, body)
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    response_id = f"{prefix}-{uuid.uuid4().hex}"
    log.info("%s: x-request-id %s, %d prompt(s)", response_id, request_id_of(request), len(prompts))
    handles = _submit(_client(request), response_id, prompts, sampling, spec, body.choices_per_prompt)
    watcher = asyncio.ensure_future(_abort_on_disconnect(request, handles))
    try:
        try:
            admitted = [await handle.admitted() for handle in handles]  # 4xx from the engine, before any stream
        except APIError as exc:
            raise _as_sent(exc, body) from None
        builder = ResponseBuilder(kind, response_id, body.model, admitted[0].spec)
        prompt_tokens = sum(a.prompt_tokens for a in admitted[:: body.choices_per_prompt])  # each prompt once
        if not body.stream:
            return await _collect(handles, builder, prompt_tokens)
    except BaseException:
        _abort_all(handles)
        raise
    finally:
        watcher.cancel()  # a stream's disconnects are seen by Starlette, which cancels `_stream`
    return StreamingResponse(
        _stream(handles, builder, prompt_tokens, body.include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _submit(client: EngineClient, response_id: str, prompts: list[Prompt], sampling: SamplingParams,
            spec: SpecConfig | None, n: int) -> list[RequestHandle]:
    """One engine request per prompt, of `n` choices; a handle per choice, in choice order (prompt i's
    choice j is choice i * n + j, as OpenAI numbers them). If the queue cannot take them all, none runs
    (the 429 propagates)."""
    handles: list[RequestHandle] = []
    try:
        for i, prompt in enumerate(prompts):
            engine_id = response_id if len(prompts) == 1 else f"{response_id}-{i}"
            handles += client.submit(AddRequest(engine_id, prompt, sampling, spec, n))
    except APIError:
        _abort_all(handles)
        raise
    return handles


def _abort_all(handles: list[RequestHandle]) -> None:
    for handle in handles:
        handle.abort()  # no-op for a finished one


async def _abort_on_disconnect(request: Request, handles: list[RequestHandle]) -> None:
    """While a route waits on the engine, poll the connection; a gone client aborts its requests."""
    while not all(handle.finished for handle in handles):
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        if await request.is_disconnected():
            log.info("client left; aborting %s", ", ".join(h.request_id for h in handles))
            _abort_all(handles)
            return


async def _events(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) from all the handles as they arrive, up to every final event."""
    waiting = {asyncio.ensure_future(handle.next_event()): i for i, handle in enumerate(handles)}
    try:
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=waiting.__getitem__):
                i = waiting.pop(task)
                event = task.result()
                if not event.finished:
                    waiting[asyncio.ensure_future(handles[i].next_event())] = i
                yield i, event
    finally:
        for task in waiting:
            task.cancel()


async def _collect(handles: list[RequestHandle], builder: ResponseBuilder, prompt_tokens: int) -> Response:
    """Non-streaming: gather the events into one body."""
    parts: list[list[str]] = [[] for _ in handles]
    logprobs: list[list[TokenLogprob] | None] = [None for _ in handles]  # stay None unless the request asked
    finals: dict[int, TokenEvent] = {}
    async for i, event in _events(handles):
        parts[i].append(event.text)
        if event.logprobs is not None:
            logprobs[i] = (logprobs[i] or []) + event.logprobs
        if event.finished:
            _raise_for_final(event)
            finals[i] = event
    choices = [("".join(parts[i]), finals[i].finish_reason, logprobs[i]) for i in range(len(handles))]
    stats = merged_stats([finals[i].stats for i in range(len(handles))], prompt_tokens)
    return JSONResponse(builder.full(choices, prompt_tokens, stats))


def _raise_for_final(final: TokenEvent) -> None:
    reason = final.finish_reason
    if reason == "error":
        raise APIError(500, f"generation failed: {final.error}", None, "internal_error")
    if reason == "abort":
        raise APIError(503, "the request was cancelled (the server is shutting down)", None, "request_cancelled")


async def _stream(
    handles: list[RequestHandle], builder: ResponseBuilder, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """SSE: a role chunk, content chunks, a finish chunk per choice, an optional usage chunk, [DONE].

    The stats (`metrics`, `specdec`) ride on each choice's finish chunk (that prompt's) and on
    the usage chunk (all prompts'). Starlette cancels this generator when the client disconnects;
    `finally` then aborts the requests in the engine so their caches are freed.
    """
    stats: list[RequestStats | None] = [None] * len(handles)
    try:
        if builder.kind == "chat":  # chat streams open with the assistant role, per choice, like OpenAI's
            for i in range(len(handles)):
                yield sse(builder.chunk("", first=True, with_usage_key=include_usage, index=i))
        async for i, event in _events(handles):
            if event.finished:
                if event.finish_reason in ("error", "abort"):
                    _raise_for_final(event)
                chunk = builder.chunk(event.text or None, event.finish_reason, with_usage_key=include_usage, index=i,
                                      logprobs=event.logprobs)
                chunk.update(stats_fields(event.stats, builder.spec))
                yield sse(chunk)
                stats[i] = event.stats
            elif event.text or event.logprobs:  # tokens whose text is held back still carry their logprobs
                yield sse(builder.chunk(event.text, with_usage_key=include_usage, index=i, logprobs=event.logprobs))
        if include_usage:
            yield sse(builder.usage_chunk(prompt_tokens, merged_stats(stats, prompt_tokens)))
        yield sse("[DONE]")
    except APIError as exc:
        yield sse(exc.body())
        yield sse("[DONE]")
    finally:
        _abort_all(handles)


@v1.post("/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    if not body.messages:
        raise APIError(400, "messages must contain at least one message", "messages", "invalid_request")
    return await _run(request, body, "chat", [body.prompt()])


@v1.post("/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    return await _run(request, body, "completion", body.prompts())


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
        return {"max_model_len": None, "sampling_defaults": None, "kernels": None, "costs": None, "memory": None,
                "specdec": {"draft": None, "head": None, "heads": None, "default": {}, "scheduler": None}}
    return {"max_model_len": info.max_model_len, "sampling_defaults": info.sampling_defaults, "kernels": info.kernels,
            "costs": info.costs, "memory": info.memory,
            "specdec": {"draft": info.draft, "head": info.head, "heads": info.heads,
                        "default": info.default_spec.model_dump(), "scheduler": info.scheduler}}


@ops.get("/health")
async def health(request: Request) -> JSONResponse:
    client = _client(request)
    body = {"status": client.state, "restarts": client.restarts}
    if client.last_error and client.state != READY:
        body["error"] = client.last_error
    return JSONResponse(body, status_code=200 if client.state == READY else 503)


@ops.get("/version")
async def version() -> dict:
    return {"version": __version__}


@ops.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

