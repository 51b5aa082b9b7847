"""Request bodies of the OpenAI routes, typed for FastAPI.

Only the wire format lives here. Sampling and speculation rules live in engine.params
(`SamplingParams`, `SpecConfig`); `to_sampling` and `to_spec` hand the values over so
those models validate them, once, here at the edge. Parameters we accept on the wire but cannot honour are
listed in `unsupported()` and answered with a 400, never silently ignored; unknown
fields are rejected like OpenAI does ("Unrecognized request argument"). Fields OpenAI defines
that cannot change what this server generates (`ignored_fields`) are accepted and dropped, with a
warning once per field name.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.events import MAX_CHOICES
from engine.params import SamplingParams, SpecConfig

log = logging.getLogger(__name__)
_warned: set[str] = set()  # ignored field names already logged


class WireModel(BaseModel):
    """A request body (or part of one) that forbids unknown fields but drops `ignored_fields`."""

    model_config = ConfigDict(extra="forbid")
    ignored_fields: ClassVar[frozenset[str]] = frozenset()
    wire_prefix: ClassVar[str] = ""  # where the fields sit in the body, for the warning

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.ignored_fields & data.keys():
            return data
        for name in sorted(cls.ignored_fields & data.keys()):
            if cls.wire_prefix + name not in _warned:
                _warned.add(cls.wire_prefix + name)
                log.warning("ignoring request field %r: accepted for OpenAI compatibility, it does not change "
                            "the output (warned once)", cls.wire_prefix + name)
        return {key: value for key, value in data.items() if key not in cls.ignored_fields}


class StreamOptions(WireModel):
    ignored_fields = frozenset({"include_obfuscation"})  # padding against side channels; we send none
    wire_prefix = "stream_options."

    include_usage: bool = False


ANY_JSON_OBJECT = '{"type": "object"}'  # what response_format json_object asks for


class JsonSchemaFormat(WireModel):
    """OpenAI's `response_format.json_schema`: the schema the output must follow."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="a JSON schema; {} is any JSON")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(WireModel):
    """`text` (default), `json_object` (any JSON object) or `json_schema`: JSON enforced token by token by a
    grammar (engine/grammar.py), for the draft and the target alike."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format needs 'json_schema' exactly when its type is 'json_schema'")
        return self

    def schema_text(self) -> str | None:
        """The JSON schema, as text, that the engine enforces; None for plain text."""
        if self.type == "json_object":
            return ANY_JSON_OBJECT
        if self.json_schema is not None:
            return json.dumps(self.json_schema.schema_)
        return None


class ContentPart(BaseModel):
    """One part of a message's content; ChatMessage accepts only text (and refusal parts of assistant history)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    refusal: str | None = None


class ChatMessage(WireModel):
    ignored_fields = frozenset({"refusal", "annotations"})  # what an assistant reply carries, echoed as history
    wire_prefix = "messages[]."

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: list[Any] | None = None  # assistant history: only an empty list (no tool calling)
    function_call: Any = None  # assistant history: only null
    audio: Any = None  # assistant history: only null (no audio output)

    @field_validator("content")
    @classmethod
    def _text_content(cls, content: str | list[ContentPart] | None, info: ValidationInfo) -> Any:
        """Like OpenAI: only an assistant's content may be null; parts must be text."""
        role = info.data.get("role")
        if content is None and role not in (None, "assistant"):
            raise PydanticCustomError("content_required", "content is required for a {role} message", {"role": role})
        for part in content if isinstance(content, list) else ():
            if part.type == "refusal" and role == "assistant" and part.refusal is not None:
                continue
            if part.type != "text":
                raise PydanticCustomError("unsupported_parameter", "this model accepts only text content parts")
            if part.text is None:
                raise PydanticCustomError("text_required", "a text content part needs 'text'")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if part.type == "text" else part.refusal or "" for part in self.content)

    def unsupported(self, where: str) -> list[tuple[str, str]]:
        """History this server cannot render: tool calls and audio."""
        out = []
        if self.tool_calls:
            out.append((f"{where}.tool_calls", "tool calling is not supported"))
        if self.function_call is not None:
            out.append((f"{where}.function_call", "tool calling is not supported"))
        if self.audio is not None:
            out.append((f"{where}.audio", "audio is not supported"))
        return out


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Chat messages as plain dicts for the tokenizer's chat template (in the engine process)."""
    return [{"role": m.role, "content": m.text()} for m in messages]


class BaseCompletionRequest(WireModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    ignored_fields = frozenset({"service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier"})

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="extension (vLLM): 0 or -1 disables")
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(False, description="extension (vLLM): keep going past EOS")
    specdec: dict[str, Any] | None = Field(None, description="extension: SpecConfig fields over the server default")
    user: str | None = None  # metadata only
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="independent choices (default 1); they share "
                          "the prompt's prefill")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = Field(None, description="extension (vLLM): 1 disables")
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(None, description="extension (vLLM): no EOS or stop_token_ids before this many")
    stop_token_ids: list[int] | None = Field(None, description="extension (vLLM): token ids that end the completion")
    response_format: ResponseFormat | None = Field(None, description="JSON output; on completions an extension (vLLM)")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def max_tokens_param(self) -> str:
        """The name the client gave the completion limit."""
        return "max_tokens"

    def to_sampling(self) -> SamplingParams:
        """Raises pydantic.ValidationError, which the route turns into a 400 naming the field."""
        fields = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "max_tokens": self.requested_max_tokens(),
            "stop": self.stop,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias,
            "min_tokens": self.min_tokens,
            "stop_token_ids": self.stop_token_ids,
            "json_schema": self.response_format.schema_text() if self.response_format else None,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        return SamplingParams.model_validate({**fields, "ignore_eos": self.ignore_eos,
                                              "logprobs": self.requested_logprobs()})

    def requested_logprobs(self) -> int | None:
        """How many top alternatives to report with each token's logprob; None: no logprobs."""
        return None

    def to_spec(self) -> SpecConfig | None:
        """The request's partial SpecConfig (the engine merges it over its default); None: the default.
        Raises pydantic.ValidationError, which the route turns into a 400 naming `specdec.<field>`."""
        return SpecConfig.model_validate(self.specdec) if self.specdec else None

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, why) for every parameter set to a value this server cannot honour."""
        out: list[tuple[str, str]] = []
        if self.stream_options is not None and not self.stream:
            out.append(("stream_options", "stream_options is only allowed when stream is true"))
        return out


class ChatCompletionRequest(BaseCompletionRequest):
    # reasoning_effort: this server serves no reasoning model, so there is no effort to set (vLLM ignores it too)
    ignored_fields = BaseCompletionRequest.ignored_fields | {"reasoning_effort"}

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def prompt(self) -> list[dict]:
        return template_messages(self.messages)

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.top_logprobs and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        for name in ("tools", "functions"):
            if getattr(self, name):
                out.append((name, "tool calling is not supported"))
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                out.append((name, "tool calling is not supported"))
        if self.modalities and set(self.modalities) != {"text"}:
            out.append(("modalities", "only text output is supported"))
        for i, message in enumerate(self.messages):
            out += message.unsupported(f"messages.{i}")
        return out


class CompletionRequest(BaseCompletionRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5, description="0: the sampled token's logprob only")
    best_of: int | None = None
    suffix: str | None = None

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids: a list of them gets one choice each, in order (like OpenAI)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)  # type: ignore[arg-type]
        return [prompt]  # type: ignore[list-item]

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.best_of not in (None, 1):
            out.append(("best_of", "only best_of=1 is supported"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported"))
        return out
