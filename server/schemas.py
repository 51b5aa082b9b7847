"""Request bodies of the OpenAI routes, typed for FastAPI.

Only the wire format lives here. Sampling and speculation rules live in engine.params
(`SamplingParams`, `SpecConfig`); `to_sampling` and `to_spec` hand the values over so
those models validate them, once, here at the edge. Parameters we accept on the wire but cannot honour are
listed in `unsupported()` and answered with a 400, never silently ignored; unknown
fields are rejected like OpenAI does ("Unrecognized request argument").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.params import SamplingParams, SpecConfig


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class BaseCompletionRequest(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="extension (vLLM): 0 disables")
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(False, description="extension (vLLM): keep going past EOS")
    specdec: dict[str, Any] | None = Field(None, description="extension: SpecConfig fields over the server default")
    user: str | None = None  # metadata only
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = Field(None, description="extension (vLLM): 1 disables")
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(None, description="extension (vLLM): no EOS or stop_token_ids before this many")
    stop_token_ids: list[int] | None = Field(None, description="extension (vLLM): token ids that end the completion")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

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
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, why) for every parameter set to a value this server cannot honour."""
        out: list[tuple[str, str]] = []
        if self.n not in (None, 1):
            out.append(("n", "only n=1 is supported"))
        if self.stream_options is not None and not self.stream:
            out.append(("stream_options", "stream_options is only allowed when stream is true"))
        return out


class ChatCompletionRequest(BaseCompletionRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt(self) -> list[dict]:
        """Chat messages as plain dicts for the tokenizer's chat template (in the engine process)."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]

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
        if self.response_format and self.response_format.get("type") != "text":
            out.append(("response_format", "only response_format {'type': 'text'} is supported"))
        return out


class CompletionRequest(BaseCompletionRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5, description="0: the sampled token's logprob only")
    best_of: int | None = None
    suffix: str | None = None

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_value(self) -> str | list[int]:
        """A single prompt as text or token ids; batches are a 400 (the route reports it)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return prompt[0]  # type: ignore[return-value]
        return prompt  # type: ignore[return-value]

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                out.append(("prompt", "only one prompt per request is supported"))
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.best_of not in (None, 1):
            out.append(("best_of", "only best_of=1 is supported"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported"))
        return out
