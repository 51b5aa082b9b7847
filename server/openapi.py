"""/openapi.json that tells a client (or a fuzzer such as schemathesis) what FastAPI cannot know.

- `model` is the served model name (an enum and an example), so generated requests reach the handlers.
- Validation errors are 400s in OpenAI's shape, not FastAPI's 422: the error responses of the
  API routes are documented with that shape, so their bodies can be checked against it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from fastapi import FastAPI

ERROR_STATUSES = {"400": "invalid request", "401": "missing or wrong API key", "404": "unknown model",
                  "413": "request body too large", "429": "queue full", "500": "generation failed",
                  "503": "engine not ready, or the request was cancelled"}
UNDOCUMENTED_ERRORS = ("/health", "/metrics", "/version")  # /health's 503 has its own body
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}


def install_openapi(app: FastAPI, served_names: Callable[[], list[str]]) -> None:
    """Replace `app.openapi` (what /openapi.json serves) by FastAPI's schema with our patches;
    the model names are read on every call, since the target's name is known only once the engine is up."""
    generate = app.openapi  # FastAPI's own; it caches its result

    def openapi() -> dict:
        schema = copy.deepcopy(generate())
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        names = served_names()
        if names:
            for component in components.values():
                if "model" in component.get("properties", {}):
                    component["properties"]["model"] = {"type": "string", "title": "Model", "enum": names,
                                                        "examples": names}
        for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 bodies, documented no more
            components.pop(unused, None)
        components["ErrorResponse"] = ERROR_SCHEMA
        for path, operations in schema.get("paths", {}).items():
            if path not in UNDOCUMENTED_ERRORS:
                for operation in operations.values():
                    _document_errors(operation["responses"])
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_errors(responses: dict) -> None:
    responses.pop("422", None)  # FastAPI's validation error; ours is a 400
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for status, description in ERROR_STATUSES.items():
        responses.setdefault(status, {"description": description, **error})
