"""vLLM's /tokenize and /detokenize, answered by the engine's own tokenizer.

The tokenizer lives in the engine process (engine/worker.py answers TokenizeRequest and
DetokenizeRequest between steps): the server never loads model files or torch, and the count
is exactly what a generation request would use (same chat template, same role mapping).
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from engine.events import DetokenizeRequest, TokenizeRequest
from server.auth import require_api_key
from server.errors import APIError
from server.routes import served_model_name
from server.schemas import ChatMessage, template_messages


class TokenizeBody(BaseModel):
    """vLLM's two shapes in one: `prompt` (text) or `messages` (through the chat template)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, description="text prompts: add the tokenizer's special tokens")
    add_generation_prompt: bool = Field(True, description="messages: end with the assistant's turn opening")


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


async def tokenize(request: Request, body: TokenizeBody) -> dict:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt and messages", "prompt", "invalid_request")
    _check_model(request, body.model)
    prompt = body.prompt if body.messages is None else template_messages(body.messages)
    query = TokenizeRequest(f"tokenize-{uuid.uuid4().hex}", prompt, body.add_special_tokens,
                            body.add_generation_prompt)
    answer = await request.app.state.engine.query(query)
    return {"tokens": answer.tokens, "count": len(answer.tokens), "max_model_len": answer.max_model_len}


async def detokenize(request: Request, body: DetokenizeBody) -> dict:
    _check_model(request, body.model)
    answer = await request.app.state.engine.query(DetokenizeRequest(f"detokenize-{uuid.uuid4().hex}", body.tokens))
    return {"prompt": answer.text}


def _check_model(request: Request, model: str | None) -> None:
    """`model` is optional here (as in vLLM); when sent, it must be the served one."""
    request.app.state.engine.check_ready()
    name = served_model_name(request)
    if model is not None and model != name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{name}'", "model",
                       "model_not_found")


tokenization = APIRouter(dependencies=[Depends(require_api_key)])
tokenization.add_api_route("/tokenize", tokenize, methods=["POST"])
tokenization.add_api_route("/detokenize", detokenize, methods=["POST"])
