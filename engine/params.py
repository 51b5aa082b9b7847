"""The two parameter objects that travel from the HTTP request to the speculation loop.

Both are pydantic models, validated once where they are built (the server validates a request
body with them), and plain data (no tensors), so they cross process queues as they are.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

PolicyName = Literal["none", "constant", "heuristic", "confidence", "specdec++"]
POLICY_NAMES: tuple[str, ...] = ("none", "constant", "heuristic", "confidence", "specdec++")
AUTO = "auto"  # a knob the engine sets itself from its measured costs (specdec++ threshold)
SEED_SPACE = 1 << 64  # torch's seed range: a seed of any size is reduced into it
MODEL_DEFAULT_FIELDS = ("temperature", "top_p", "top_k")  # what a model's generation_config may set


class SamplingParams(BaseModel):
    """How to turn logits into tokens, and when a completion ends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, description="0 or -1 (vLLM's spelling) disables top-k")
    seed: int | None = Field(None, description="any integer; reduced modulo 2**64, torch's seed range")
    max_tokens: int | None = Field(None, ge=1, description="None: the rest of the context (the engine decides)")
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # The target distribution's modifiers (engine/sampling.py: LogitAdjuster), applied to the draft alike.
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="minus this on every generated token's logit")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="minus this times each token's count")
    repetition_penalty: float = Field(1.0, gt=0.0, description="divides (>0) or multiplies (<0) seen tokens' logits")
    logit_bias: dict[int, float] = Field(default_factory=dict, description="token id -> added to its logit")
    min_tokens: int = Field(0, ge=0, description="EOS and stop_token_ids are masked until this many tokens")
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = Field(None, ge=0, le=20, description="report each token's logprob and this many top")
    # Structured output (engine/grammar.py): the output is JSON valid under this schema, given as JSON text.
    json_schema: str | None = Field(None, description='a JSON schema as text; \'{"type": "object"}\' is any object')

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, value: int) -> int:
        return 0 if value == -1 else value

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: int | None) -> int | None:
        return None if value is None else value % SEED_SPACE

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: object) -> object:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        return tuple(value)  # type: ignore[arg-type]

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_by_token_id(cls, value: object) -> object:
        if value is None:
            return {}
        if isinstance(value, dict) and not all(str(k).strip().isdigit() for k in value):
            raise ValueError("logit_bias keys must be token ids (non-negative integers)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, value: dict[int, float]) -> dict[int, float]:
        if any(not -100.0 <= bias <= 100.0 for bias in value.values()):
            raise ValueError("logit_bias values must lie in [-100, 100]")
        return value

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids_as_tuple(cls, value: object) -> object:
        return () if value is None else tuple(value)  # type: ignore[arg-type]

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids_non_negative(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(t < 0 for t in value):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens_within_max(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"min_tokens ({value}) must be <= max_tokens ({max_tokens})")
        return value

    @field_validator("json_schema")
    @classmethod
    def _schema_is_an_object(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                schema = json.loads(value)
            except ValueError:
                raise ValueError("json_schema must be JSON text") from None
            if not isinstance(schema, dict):
                raise ValueError("json_schema must be a JSON object")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether any penalty, bias or min_tokens modifies the distribution (False: the logits go unchanged)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    def token_id_field_beyond(self, vocab_size: int) -> str | None:
        """The field naming a token id outside [0, vocab_size), if any: the engine rejects the request."""
        if any(t >= vocab_size for t in self.logit_bias):
            return "logit_bias"
        if any(t >= vocab_size for t in self.stop_token_ids):
            return "stop_token_ids"
        return None

    def with_defaults(self, defaults: dict[str, Any]) -> SamplingParams:
        """These params, with `defaults` for the fields the caller did not set (a model's
        generation_config, which the server applies as vLLM does)."""
        unset = {name: value for name, value in defaults.items() if name not in self.model_fields_set}
        return self.model_copy(update=unset) if unset else self


def generation_config_defaults(generation_config: Any) -> dict[str, Any]:
    """The temperature, top_p and top_k a model's generation_config sets (only values that differ
    from transformers' defaults, as vLLM reads them); a value SamplingParams rejects is left out."""
    if generation_config is None:
        return {}
    diff = generation_config.to_diff_dict()
    out = {}
    for name in MODEL_DEFAULT_FIELDS:
        if diff.get(name) is None:
            continue
        try:
            out[name] = getattr(SamplingParams.model_validate({name: diff[name]}), name)
        except ValueError:
            continue
    return out


class SpecConfig(BaseModel):
    """Which stop policy decides the candidate length, and its knobs.

    `none` is the target alone; `constant` proposes `k` tokens; `heuristic` starts at `k`
    and grows by 2 after a fully accepted round, shrinks by 1 otherwise; `confidence`
    stops when the draft's probability of its token falls below `p_min`; `specdec++`
    stops when the head's estimated P(some candidate rejected) exceeds `threshold` ("auto": a level
    the engine derives every round from its measured costs, with each round's candidate budget).
    `bounds` (min, max) clamp the candidate length of `heuristic`, `confidence` and `specdec++`
    (`constant` proposes exactly k); `specdec++` also proposes no deeper than its head was trained on
    (the head's `max_position`, engine/policies.py).

    `head` names which of the engine's acceptance heads serves `specdec++` (None: its default).

    `num_drafts` M > 1 draws M candidate paths per round, each with its own stop decisions, and verifies them
    together in one target forward (Yin et al. 2024, batch speculative decoding): lossless, and more tokens
    accepted per target call than one path (engine/multidraft.py).

    `over_acceptance` (epsilon) accepts a candidate with probability min(1, (p + epsilon) / q) instead of
    min(1, p / q): fewer rejections for a bounded bias (Yin et al. 2024, the Pareto front; docs/design.md).
    Above 0 the output is NOT the target's distribution. Per request only, and only where the engine allows
    it (`--max-over-acceptance`); the default 0 is lossless.

    A request's SpecConfig may be partial: the engine runs it as its default with the fields the
    request set (`with_overrides`), so unset fields follow the server's flags.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: PolicyName = "specdec++"
    k: int = Field(4, ge=1, le=64)
    threshold: float | Literal["auto"] = Field(
        AUTO, description='"auto": the level the cost model derives each round (engine/tuning.py); a number fixes it')
    bounds: tuple[int, int] = (1, 20)
    p_min: float = Field(0.4, gt=0.0, lt=1.0)
    head: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="acceptance head name")
    num_drafts: int = Field(1, ge=1, le=8, description="draft paths per round, verified jointly (batch speculative "
                            "decoding); each path proposes up to the policy's candidates")
    over_acceptance: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                                   description="epsilon of lossy over-acceptance; 0 is lossless")

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_auto_or_probability(cls, value: object) -> object:
        """"auto", or a number strictly inside (0, 1): one error naming the field either way."""
        if value == AUTO:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError('threshold must be "auto" or a number in (0, 1)')
        try:
            number = float(value)
        except ValueError:
            raise ValueError('threshold must be "auto" or a number in (0, 1)') from None
        if not 0.0 < number < 1.0:
            raise ValueError('threshold must be "auto" or a number in (0, 1)')
        return number

    @field_validator("bounds")
    @classmethod
    def _bounds_ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if low < 1:
            raise ValueError("bounds min must be >= 1")
        if low > high:
            raise ValueError(f"bounds min ({low}) must be <= max ({high})")
        if high > 64:
            raise ValueError("bounds max must be <= 64")
        return value

    @property
    def speculates(self) -> bool:
        return self.policy != "none"

    @property
    def lossless(self) -> bool:
        """Whether the output follows the target's distribution exactly (no over-acceptance)."""
        return self.over_acceptance == 0.0

    def runnable(self, has_head: bool, has_draft: bool) -> SpecConfig:
        """This spec narrowed to what the loaded models can run: specdec++ without a head falls back to
        constant k, any policy without a draft to the target alone."""
        if not has_draft:
            return self.model_copy(update={"policy": "none"}) if self.policy != "none" else self
        if not has_head and self.policy == "specdec++":
            return self.model_copy(update={"policy": "constant"})
        return self

    def with_overrides(self, spec: SpecConfig | None) -> SpecConfig:
        """This (the engine's default) with the fields `spec` sets; both were validated when built,
        so a partial spec from a request body (`SpecConfig.model_validate({"k": 6})`) changes only k."""
        if spec is None:
            return self
        return self.model_copy(update={name: getattr(spec, name) for name in spec.model_fields_set})
