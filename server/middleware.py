"""ASGI middleware around every route: the x-request-id, the request body limit, CORS.

Both of ours are plain ASGI (not Starlette's BaseHTTPMiddleware), so streaming responses and
disconnect detection pass through untouched.
"""

from __future__ import annotations

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"


def request_id_of(request: Request) -> str:
    """The request's x-request-id (the client's, or one the server made up)."""
    return request.scope.get("state", {}).get("request_id", "")


class RequestIdMiddleware:
    """Every response carries `x-request-id`: the client's own header echoed, or a fresh one.

    An exception no handler caught still gets an OpenAI-shaped 500 with the id (then propagates,
    so it is logged), as long as no response had started.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode())
        request_id = sent.decode("latin-1") if sent else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode(
                    "latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if not started:
                await _send_error(send_with_id, 500, "internal server error", "internal_error")
            raise


class BodyLimitMiddleware:
    """Refuse a body over `max_bytes` with a 413 before it is parsed: at once when Content-Length
    says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_error(send, 413, self._message(int(length)), "request_too_large")
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI re-raises an HTTPException from reading the body
                    raise StarletteHTTPException(413, self._message(received))
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: int) -> str:
        return f"the request body ({size} bytes or more) exceeds the server's limit of {self.max_bytes} bytes"


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def install_middleware(app: FastAPI, max_request_bytes: int | None, allowed_origins: list[str] | None) -> None:
    """Innermost first: the body limit, CORS (only with allowed origins), the request id outermost,
    so a 413 and a CORS preflight carry the id too."""
    if max_request_bytes:
        app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=[REQUEST_ID_HEADER])
    app.add_middleware(RequestIdMiddleware)
