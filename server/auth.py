"""Bearer-token auth for /v1/*; /health and /metrics stay open."""

from __future__ import annotations

import secrets

from fastapi import Request

from server.errors import APIError


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 unless `Authorization: Bearer <key>` matches the server's --api-key."""
    expected: str | None = request.app.state.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key",
                       {"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise APIError(401, "incorrect API key provided", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
