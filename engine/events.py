"""The messages between the server and the engine process, and what the engine hands back.

Every message is a dataclass of ours (parameters and stats included), so it crosses the
multiprocessing queues as itself, pickled, in both directions:

  server -> engine: AddRequest, AbortRequest, TokenizeRequest, DetokenizeRequest, Shutdown
  engine -> server: EngineReady or EngineFailed (once, first), then per request Admitted or
                    RequestRejected, a TokenEvent per step (the final one carries RequestStats),
                    Tokenized or Detokenized (or RequestRejected) per tokenizer query,
                    EngineLoad whenever the engine's load changes, EngineCosts every few seconds while it
                    serves, and CalibrationReport now and then while the acceptance heads judge candidates

The tokenizer lives in the engine process only: the server never loads a model directory (nor
torch), and /tokenize then counts exactly the tokens a generation would (same chat template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine.params import SamplingParams, SpecConfig
from engine.stats import RequestStats

FinishReason = Literal["stop", "length", "abort", "error"]
Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


# ----- server -> engine -------------------------------------------------------------------
@dataclass
class AddRequest:
    """Admit a request. Both parameter objects were validated where they were built."""

    request_id: str
    prompt: Prompt
    params: SamplingParams
    spec: SpecConfig | None = None  # the fields set override the engine's default (None: the default)
    n: int = 1  # independent choices sharing the prompt's prefill, each its own engine request (`choice_ids`)

    @property
    def choice_ids(self) -> list[str]:
        return choice_ids(self.request_id, self.n)


MAX_CHOICES = 16  # most choices (`n`) one request may ask for


def choice_ids(request_id: str, n: int) -> list[str]:
    """The engine request ids of a request's `n` choices: the id itself when alone, else `{id}.{j}`. Each
    gets its own Admitted (or RequestRejected) and TokenEvents, so the server routes them like requests."""
    return [request_id] if n == 1 else [f"{request_id}.{j}" for j in range(n)]


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class TokenizeRequest:
    """Token ids of a prompt (text, ids, or chat messages through the chat template), as a request would get."""

    request_id: str
    prompt: Prompt
    add_special_tokens: bool = True  # text prompts
    add_generation_prompt: bool = True  # chat messages


@dataclass
class DetokenizeRequest:
    request_id: str
    tokens: list[int]


@dataclass
class Shutdown:
    """Abort what is left (its final events come back) and exit."""


# ----- engine -> server -------------------------------------------------------------------
@dataclass
class EngineReady:
    """The engine is built: what it serves, for /v1/models and the logs."""

    model: str
    draft: str | None
    head: str | None
    heads: dict[str, dict]  # name -> {"timing": ...}
    max_model_len: int
    default_spec: SpecConfig
    scheduler: dict  # SchedulerConfig's fields
    sampling_defaults: dict = field(default_factory=dict)  # what a request that omits them samples with
    kernels: dict = field(default_factory=dict)  # per model: the quantization and kernel timings chosen at load
    costs: dict | None = None  # the cost model measured at start (CostModel.to_dict()); None without a draft
    memory: dict | None = None  # host memory of the load (engine/loading/memory.py's load_memory)


@dataclass
class EngineFailed:
    """The engine could not be built (the traceback is in the engine's log); the process exits."""

    message: str


@dataclass
class Admitted:
    """The engine took the request; events follow."""

    request_id: str
    prompt_tokens: int
    spec: SpecConfig  # what the request runs with: the engine's default under the request's fields


@dataclass
class RequestRejected:
    """The engine cannot serve the request; `param` names the offending field."""

    request_id: str
    message: str
    param: str | None = None
    code: str | None = None


@dataclass
class TokenLogprob:
    """One emitted token's log-probability under the target's processed distribution, and the most likely
    tokens at its position (`top`, most likely first, each with an empty `top`). `token` is its text
    decoded alone, as OpenAI reports it."""

    token_id: int
    token: str
    logprob: float
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class TokenEvent:
    """New output of one request after one engine step."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)  # new completion tokens
    text: str = ""  # new completion text
    finished: bool = False
    finish_reason: FinishReason | None = None
    stats: RequestStats | None = None  # on the final event
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asks for logprobs


@dataclass
class Tokenized:
    request_id: str
    tokens: list[int]
    max_model_len: int


@dataclass
class Detokenized:
    request_id: str
    text: str


@dataclass
class EngineLoad:
    running: int
    waiting: int


@dataclass
class EngineCosts:
    """The engine's live cost model (engine/costs.py: the measured one times the smoothed scales), sent every
    few seconds while it serves, for the Prometheus gauges."""

    costs: dict  # CostModel.to_dict() of the refreshed model
    draft_scale: float
    target_scale: float
    candidate_budget: int  # what the model lets a sequence propose at the current batch size (engine/tuning.py)


@dataclass
class HeadCalibration:
    """One online calibrator's state (engine/calibration.py): a head's P(accept) = sigmoid(scale z + bias) in
    a temperature band, and how its recent predictions compare with the exact labels."""

    head: str
    band: str  # "greedy" or "sampled"
    scale: float
    bias: float
    labels: int  # judged candidates labelled since the engine started
    calibration_error: float | None  # ECE over the recent window (None before any label)
    bins: list[tuple[int, float, float]]  # reliability per bin of predicted P(accept): count, mean predicted, mean a_s


@dataclass
class CalibrationReport:
    """Every online calibrator of the engine, sent periodically while they learn."""

    heads: list[HeadCalibration]


ToEngine = AddRequest | AbortRequest | TokenizeRequest | DetokenizeRequest | Shutdown
FromEngine = (EngineReady | EngineFailed | Admitted | RequestRejected | TokenEvent | Tokenized | Detokenized
              | EngineLoad | EngineCosts | CalibrationReport)


@dataclass
class Completion:
    """A whole completion, as returned by `LLMEngine.generate`; `stats` is JSON-ready for printing or storing."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stats: dict  # RequestStats.to_dict(): the counts and the derived rates
