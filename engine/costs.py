"""The cost model: what a draft step and a target forward cost on the devices the engine runs on.

It is measured at engine start (`measure_costs`: the engine's own forwards, after a context, by
number of sequences for the draft and by number of tokens for the target) and refreshed while
serving from the engine's own timings (`LiveCosts`: a smoothed ratio of observed to modelled
seconds per model, which follows the level, e.g. when the host gets busier, plus a residual per
measured target size, which corrects a point of the shape the start-up timing got wrong). The
self-tuning rules (engine/tuning.py) and the offline evaluator
(specdecpp/bench/stop_rules.py) read the same class.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from engine.head import AcceptanceHead, candidate_features, w8a8_head
from engine.params import SamplingParams
from engine.runner import ModelRunner, RowCache, crop_cache
from engine.sampling import probs_of_processed, processed_logits, processed_probs, sample

SMOOTHING = 0.05  # least weight of one observed forward in the refreshed cost level
LONG_FORWARD = 64  # tokens from which measure_costs times a forward once, without a warm-up
DENSE_TARGET_SIZES = 9  # measure_costs times the target at every size up to this (rounds of up to 8 candidates)
STALE_WEIGHT = 0.5  # most weight of the draft observation that ends a spell without proposals
TIMING_CONTEXT = 128  # tokens of cache per sequence behind every timed forward, at start-up
HEAD_W8A8_MIN_GAIN = 1.1  # choose_head_kernel "auto": w8a8 only where one judgement measures this much faster
HEAD_W8A8_MAX_LOGIT_ERROR = 0.1  # ... and no probe's logit moves by more than this (a 2.5-point probability)
PROBE_ROWS = 64  # choose_head_kernel: standardised random inputs the quantized head's logits are checked on


def segment(sizes: list[int], x: float) -> tuple[int, int]:
    """The neighbouring measured sizes (sorted, two or more) whose segment holds x; the last one past the end."""
    i = next((i for i in range(1, len(sizes)) if x <= sizes[i]), len(sizes) - 1)
    return sizes[i - 1], sizes[i]


def interpolate(points: dict[int, float], x: float) -> float:
    """Piecewise-linear through `points` (x -> seconds), flat below the first point, extrapolated
    linearly past the last (two points or more)."""
    xs = sorted(points)
    if x <= xs[0] or len(xs) == 1:
        return points[xs[0]] if x <= xs[0] else points[xs[0]] * x / xs[0]
    lo, hi = segment(xs, x)
    return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)


def bracketing(sizes: list[int], x: float) -> list[tuple[int, float]]:
    """The measured sizes (sorted) around x with their linear-interpolation weights; the end size alone
    outside the range."""
    if x <= sizes[0]:
        return [(sizes[0], 1.0)]
    if x >= sizes[-1]:
        return [(sizes[-1], 1.0)]
    lo, hi = segment(sizes, x)
    w = (x - lo) / (hi - lo)
    return [(lo, 1.0 - w), (hi, w)] if w < 1.0 else [(hi, 1.0)]


@dataclass(frozen=True)
class CostModel:
    """Seconds per draft forward (`draft_step` for one sequence; `draft_batch` by number of sequences
    when measured), per candidate drawn (processed q and sampling), per candidate's features (rules
    that read them), per head call, and per target forward by number of tokens in it, timed as a verification
    runs it (logits at every token, the target's probabilities there): `target` for one
    sequence, `target_full` for the same tokens spread over `full_batch` sequences (a ragged batch pays
    for every sequence's cache and mask, so its marginal token costs more). `draft_tokens` times a draft
    forward by tokens of one sequence: what catching a draft up on a prompt costs."""

    draft_step: float
    draw: float
    features: float
    head: float
    target: dict[int, float]
    draft_batch: dict[int, float] = field(default_factory=dict)
    target_full: dict[int, float] = field(default_factory=dict)
    full_batch: int = 1
    refresh: bool = True  # False: the engine keeps this model as given (reproducible runs, tests), no live refresh
    machine: dict = field(default_factory=dict)
    draft_tokens: dict[int, float] = field(default_factory=dict)

    def target_seconds(self, tokens: float, sequences: int = 1) -> float:
        """A target forward over `tokens` tokens of `sequences` sequences: between the one-sequence and the
        full-batch curves, linearly in the number of sequences."""
        weight = self.full_batch_weight(sequences)
        alone = interpolate(self.target, tokens)
        return alone if weight == 0.0 else (1.0 - weight) * alone + weight * interpolate(self.target_full, tokens)

    def full_batch_weight(self, sequences: int) -> float:
        """How far a forward over `sequences` sequences sits from the one-sequence curve toward the full-batch one."""
        if sequences <= 1 or not self.target_full or self.full_batch <= 1:
            return 0.0
        return min(1.0, (sequences - 1) / (self.full_batch - 1))

    def draft_seconds(self, sequences: float) -> float:
        """One batched draft forward over `sequences` sequences (one token each)."""
        return interpolate(self.draft_batch or {1: self.draft_step}, sequences)

    def draft_feed_seconds(self, tokens: float) -> float:
        """One draft forward over `tokens` tokens of one sequence (a catch-up). Unmeasured (an older model
        file), the target's curve scaled by the ratio of a draft step to a one-token target forward."""
        if self.draft_tokens:
            return interpolate(self.draft_tokens, tokens)
        return self.target_seconds(tokens) * self.draft_step / max(self.target_seconds(1), 1e-9)

    def candidate_seconds(self, reads_features: bool = True, judged: bool = True) -> float:
        """What one candidate costs beside the draft forward: drawing it, its features, the head's judgement."""
        return self.draw + (self.features if reads_features else 0.0) + (self.head if judged else 0.0)

    def target_cost(self, n: torch.Tensor) -> torch.Tensor:
        """`target_seconds` over a tensor of token counts (the offline evaluator's vectorised form)."""
        xs = sorted(self.target)
        x = torch.tensor(xs, dtype=torch.float64)
        y = torch.tensor([self.target[k] for k in xs], dtype=torch.float64)
        n = n.double().clamp(min=xs[0])
        if len(xs) == 1:
            return y[0] * n / x[0]
        i = torch.searchsorted(x, n).clamp(1, len(xs) - 1)
        slope = (y[i] - y[i - 1]) / (x[i] - x[i - 1])
        return y[i - 1] + slope * (n - x[i - 1])

    def scaled(self, draft: float, target: float) -> CostModel:
        """This model with every draft-side cost times `draft` and every target cost times `target`."""
        return replace(
            self,
            draft_step=self.draft_step * draft,
            draw=self.draw * draft,
            features=self.features * draft,
            head=self.head * draft,
            draft_batch={b: s * draft for b, s in self.draft_batch.items()},
            draft_tokens={n: s * draft for n, s in self.draft_tokens.items()},
            target={n: s * target for n, s in self.target.items()},
            target_full={n: s * target for n, s in self.target_full.items()},
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> CostModel:
        return cls(
            raw["draft_step"], raw["draw"], raw["features"], raw["head"],
            {int(k): float(v) for k, v in raw["target"].items()},
            {int(k): float(v) for k, v in (raw.get("draft_batch") or {}).items()},
            {int(k): float(v) for k, v in (raw.get("target_full") or {}).items()},
            int(raw.get("full_batch", 1)),
            bool(raw.get("refresh", True)),
            raw.get("machine", {}),
            {int(k): float(v) for k, v in (raw.get("draft_tokens") or {}).items()},
        )

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def target_sizes(limit: int) -> list[int]:
    """Every size up to `DENSE_TARGET_SIZES`, then 12, 16, 24, 32, 48 ... (each power of two and the midpoint
    after it) up to `limit`, and `limit` itself: what a round verifies is measured size by size, since a
    kernel's cost may step at any row count (oneDNN's bf16 GEMM on an AVX-512 CPU without AMX costs the same
    from 1 to 6 rows, padded, and a quarter more from 7), and linear interpolation would smear that step."""
    sizes, n = set(range(1, min(DENSE_TARGET_SIZES + 1, limit))), 1
    while n < limit:
        sizes.add(n)
        if n >= 8 and n + n // 2 < limit:
            sizes.add(n + n // 2)
        n *= 2
    return [*sorted(sizes), limit]


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to `limit`, and `limit` itself."""
    out, n = [], 1
    while n < limit:
        out.append(n)
        n *= 2
    return [*out, limit]


def catch_up_sizes(limit: int) -> list[int]:
    """16, 64, 256 ... up to `limit`, and `limit` itself: a catch-up's cost is nearly linear in its tokens,
    so a few sizes place the line (1 token is the draft step)."""
    out, n = [], 16
    while n < limit:
        out.append(n)
        n *= 4
    return [*out, limit] if limit > 1 else out


def monotone(points: dict[int, float]) -> dict[int, float]:
    """Timings made non-decreasing in size, each point lowered to the least time of any larger size:
    more tokens never cost less, and noise (another process, a cold cache) only ever adds time, so a
    point above a larger one is the noisy one. A negative marginal cost would tell the tuning rules
    that a longer round is free."""
    out, low = {}, math.inf
    for x in sorted(points, reverse=True):
        low = min(low, points[x])
        out[x] = low
    return dict(sorted(out.items()))


def fastest(fn: Callable[[], object], times: int, warm_up: bool = True,
            before: Callable[[], object] | None = None, wait: Callable[[], object] | None = None) -> float:
    """The fastest of `times` calls after a warm-up: another process stealing the CPU (or an
    OpenMP thread descheduled) only ever adds time, so the minimum is the cost this host can do.
    `before`, if given, runs untimed ahead of every call; `wait` (a runner's `synchronize`) ends each timed call
    when its queued device work does."""
    if warm_up:
        fn()  # first calls allocate
    samples = []
    for _ in range(times):
        if before is not None:
            before()
        if wait is not None:
            wait()
        t0 = time.perf_counter()
        fn()
        if wait is not None:
            wait()
        samples.append(time.perf_counter() - t0)
    return min(samples)


def draft_stepper(draft: ModelRunner, context: int, generator: torch.Generator,
                  cache: RowCache | None = None) -> Callable[[], None]:
    """A callable running one draft step on a one-sequence context of `context` tokens (`cache`, else one of random
    tokens prefilled now; cropped back after each step). The per-candidate work is timed right after one, as a round
    runs it, when the step's weights have pushed the head's and the vocabulary's tensors out of the cache."""
    if cache is None:
        cache = draft.new_cache()
        draft.forward(random_ids(draft, context, generator).unsqueeze(0), cache)

    def step() -> None:
        draft.forward_batch([random_ids(draft, 1, generator)], [cache], [1])
        crop_cache(cache, context)

    return step


def random_ids(runner: ModelRunner, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, runner.vocab_size, (n,), generator=generator)


@torch.inference_mode()
def choose_head_kernel(head: AcceptanceHead, draft: ModelRunner, requested: str = "auto",
                       context: int = TIMING_CONTEXT, reps: int = 7) -> tuple[AcceptanceHead, dict]:
    """The head as it judges fastest on this host, and what was measured: `requested` "none" keeps it as trained,
    "w8a8" quantizes it (`w8a8_head`), "auto" quantizes it where, timed right after a draft step as a round runs
    it, one judgement is at least HEAD_W8A8_MIN_GAIN faster and the logits of probe inputs stay within
    HEAD_W8A8_MAX_LOGIT_ERROR of the trained head's. A CUDA head is left as trained."""
    choice: dict = {"requested": requested, "quantization": "none"}
    if requested == "none" or head.out.weight.device.type != "cpu":
        return head, choice
    try:
        quantized = w8a8_head(head)
    except ValueError as error:  # no quantized CPU engine in this torch build
        if requested == "w8a8":
            raise
        return head, choice | {"unavailable": str(error)}
    if requested == "w8a8":  # asked for (or rank 0's choice, replayed): nothing to measure
        return quantized, choice | {"quantization": "w8a8"}
    generator = torch.Generator().manual_seed(0)
    h, f = head.config.hidden_size, len(head.config.features)  # probes as the head standardises them: N(0, 1)
    states = head.input_mean + torch.randn(PROBE_ROWS, h, generator=generator) / head.input_scale
    features = head.feature_mean + torch.randn(PROBE_ROWS, f, generator=generator) / head.feature_scale
    error = max((quantized(states[i : i + 1], features[i : i + 1]) - head(states[i : i + 1], features[i : i + 1]))
                .abs().item() for i in range(PROBE_ROWS))
    step = draft_stepper(draft, context, generator)
    ms = {name: 1e3 * fastest(lambda m=model: m.accept_prob(states[:1], features[:1]), reps, before=step)
          for name, model in (("none", head), ("w8a8", quantized))}
    choice |= {"ms_after_draft_step": ms, "max_logit_error": round(error, 4)}
    if ms["none"] >= HEAD_W8A8_MIN_GAIN * ms["w8a8"] and error <= HEAD_W8A8_MAX_LOGIT_ERROR:
        return quantized, choice | {"quantization": "w8a8"}
    return head, choice


@torch.inference_mode()
def measure_costs(
    target: ModelRunner,
    draft: ModelRunner,
    head: AcceptanceHead | None = None,
    *,
    context: int = TIMING_CONTEXT,
    max_tokens: int = 64,
    max_sequences: int = 8,
    reps: int = 3,
) -> CostModel:
    """Time the engine's own forwards on this host, after `context` tokens of cache per sequence: the
    target over the `target_sizes` up to `max_tokens` tokens of one sequence and over those from `max_sequences`
    on spread over `max_sequences` sequences, the draft over 1, 2, 4 ... `max_sequences` sequences of
    one token (ragged batches, as the round runs them) and over 16, 64 ... `max_tokens` tokens of one
    sequence (a catch-up), and the per-candidate work (draw, features, head), each right after a draft step."""
    generator = torch.Generator().manual_seed(0)
    limit = min(getattr(m.config, "max_position_embeddings", None) or 4096 for m in (target, draft))
    context = min(context, limit // 2)
    max_tokens = max(1, min(max_tokens, limit - context))

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, min(target.vocab_size, draft.vocab_size), (n,), generator=generator)

    def prefilled(runner: ModelRunner, sequences: int) -> list:
        caches = [runner.new_cache() for _ in range(sequences)]
        for cache in caches:
            runner.forward(ids(context).unsqueeze(0), cache)
        return caches

    def timed(runner: ModelRunner, caches: list, n: int, verification: bool = False) -> float:
        """One forward of `n` tokens spread over `caches` (cropped back to the context after each call); a
        `verification` as a round runs it: logits at every token and the target's probabilities there.
        From LONG_FORWARD tokens on, allocation and noise are small against the forward itself: one
        call, no warm-up (the counts depend on `n` alone, so every rank of a TP target calls alike); and
        such a forward is a prefill chunk, whose only logits are its last token's."""
        sizes = [n // len(caches) + (i < n % len(caches)) for i in range(len(caches))]
        verification = verification and n < LONG_FORWARD

        def once() -> None:
            _, logits = runner.forward_batch([ids(size) for size in sizes], caches,
                                             sizes if verification else [1] * len(caches))
            if verification:
                for rows in logits:
                    probs_of_processed(processed_logits(rows, verify_params), verify_params)
            for cache in caches:
                crop_cache(cache, context)

        long = n >= LONG_FORWARD
        return fastest(once, 1 if long else reps, warm_up=not long, wait=runner.synchronize)

    verify_params = SamplingParams(temperature=1.0)
    one_sequence = prefilled(target, 1)
    target_one = monotone({n: timed(target, one_sequence, n, verification=True) for n in target_sizes(max_tokens)})
    del one_sequence
    full = min(max_sequences, max_tokens)
    full_batch = prefilled(target, full)
    target_full = monotone({n: timed(target, full_batch, n, verification=True)
                            for n in target_sizes(max_tokens) if n >= full})
    del full_batch
    draft_one = prefilled(draft, 1)  # the one-sequence context serves the step and the catch-ups
    draft_batch = monotone({b: timed(draft, draft_one if b == 1 else prefilled(draft, b), b)
                            for b in powers_of_two(max_sequences)})
    draft_tokens = monotone({1: draft_batch[1]} | {n: timed(draft, draft_one, n) for n in catch_up_sizes(max_tokens)})

    draft_step = draft_stepper(draft, context, generator, cache=draft_one[0])
    logits = draft.logits(torch.randn(1, draft.hidden_size, dtype=draft.dtype, device=draft.device)).float()
    params = SamplingParams(temperature=1.0)
    one, token = torch.ones(1, device=logits.device), torch.zeros(1, dtype=torch.long, device=logits.device)
    features = candidate_features(logits, token, one, one, one)
    state = torch.randn(1, draft.hidden_size, device=draft.device)
    per_candidate = {
        "draw": fastest(lambda: sample(processed_probs(logits, params), None), 2 * reps + 1, before=draft_step,
                        wait=draft.synchronize),
        "features": fastest(lambda: candidate_features(logits, token, one, one, one), 2 * reps + 1, before=draft_step,
                            wait=draft.synchronize),
        "head": fastest(lambda: head.accept_prob(state, features), 2 * reps + 1, before=draft_step,
                        wait=draft.synchronize) if head is not None else 0.0,
    }
    return CostModel(
        draft_step=draft_batch[1],
        **per_candidate,
        target=target_one,
        draft_batch=draft_batch,
        target_full=target_full,
        full_batch=full,
        draft_tokens=draft_tokens,
    )


class LiveCosts:
    """The measured cost model, refreshed from the engine's own timings.

    Each observation compares the seconds a draft proposal or a target forward took with what the
    measured model predicts for it; a running mean of the log ratio per model (weight 1/n for the n-th
    observation, `smoothing` once that is smaller) scales that model's costs, so the level follows the
    host: the first observations correct a start-up measurement that a busy host spoiled, later ones
    move it slowly, and a single stalled forward moves it by a bounded factor. Each measured target size
    also keeps a log correction, moved by every forward around it (`_observe_shape`): the shape (how cost
    grows with tokens) is learnt where the engine runs, and sizes it never ran follow the level.
    """

    def __init__(self, measured: CostModel, smoothing: float = SMOOTHING) -> None:
        self.measured = measured
        self.smoothing = smoothing
        self._log_scale = {"draft": 0.0, "target": 0.0}
        self._observations = {"draft": 0, "target": 0}
        # The target curves' shape, learnt too: a log correction per measured size (and its observation count),
        # so one start-up point a busy host spoiled (2 tokens timed at twice 1) is corrected by the first forward
        # of that size, which a probe round provides when that point kept rounds from speculating.
        self._shape: dict[str, dict[int, float]] = {"target": {}, "target_full": {}}
        self._shape_observations: dict[str, dict[int, int]] = {"target": {}, "target_full": {}}
        self._rounds_without_draft = 0  # target forwards since the draft was last observed
        self.current = measured

    @property
    def draft_scale(self) -> float:
        return math.exp(self._log_scale["draft"])

    @property
    def target_scale(self) -> float:
        return math.exp(self._log_scale["target"])

    def _observe(self, model: str, observed: float, predicted: float, stale: int = 0) -> None:
        """`stale`: target forwards since the last observation of this model. A draft level left unobserved
        (rounds without candidates) is old news, so the probe that ends such a spell weighs more
        (`smoothing` per round missed, up to STALE_WEIGHT): a level a busy spell pushed up, which then kept
        every round from proposing, recovers in a probe or two instead of tens."""
        if predicted <= 0.0 or observed <= 0.0 or not self.measured.refresh:
            return
        self._observations[model] += 1
        weight = max(self.smoothing, 1.0 / self._observations[model], min(STALE_WEIGHT, self.smoothing * stale))
        self._log_scale[model] += weight * (math.log(observed / predicted) - self._log_scale[model])

    def _observe_shape(self, tokens: int, seconds: float, sequences: int) -> None:
        """Learn the curves' shape: a log correction per measured size, moved by the forward's error against
        the prediction `target_seconds` makes for it (the one-sequence and full-batch curves blended by the
        number of sequences) and shared between the curves by that blend's weights, and within a curve
        between the two measured sizes around `tokens` by the interpolation's weights (a step of gradient
        descent on the log error). A forward of 11 tokens between points 9 and 12 thus moves them one to
        two, and the curves come to pass through what the shapes the engine runs cost, where they fall
        between the measured ones too. Points never observed follow the level."""
        if seconds <= 0.0 or not self.measured.refresh:
            return
        learnt = replace(self.measured, target=self._learnt("target"), target_full=self._learnt("target_full"))
        weight = learnt.full_batch_weight(sequences)
        predicted = learnt.target_seconds(tokens, sequences)
        if predicted <= 0.0:
            return
        error = math.log(seconds / predicted)
        for curve, share_of_curve in (("target", 1.0 - weight), ("target_full", weight)):
            if share_of_curve <= 0.0:
                continue
            for size, share in bracketing(sorted(getattr(self.measured, curve)), tokens):
                counts = self._shape_observations[curve]
                count = counts[size] = counts.get(size, 0) + 1
                start = self._shape[curve].get(size, self._log_scale["target"])  # an unlearnt point follows the level
                self._shape[curve][size] = start + share_of_curve * share * max(self.smoothing, 1.0 / count) * error

    def _rebuild(self) -> None:
        level = self.measured.scaled(self.draft_scale, self.target_scale)
        self.current = replace(level, target=monotone(self._learnt("target")),
                               target_full=monotone(self._learnt("target_full")))

    def _learnt(self, curve: str) -> dict[int, float]:
        """A target curve with its learnt corrections, before `monotone`: the shape learning's errors are
        taken against this one, so each point converges to what its sizes cost. (Against the monotone
        curve, a point clamped down to a larger size's time kept an error no step could reduce, and its
        correction grew without bound.)"""
        learnt = self._shape[curve]
        return {n: s * math.exp(learnt[n]) if n in learnt else s * self.target_scale
                for n, s in getattr(self.measured, curve).items()}

    def state(self) -> dict:
        """The measured model and the learnt scales and shape, as plain data."""
        return {"measured": self.measured.to_dict(), "log_scale": dict(self._log_scale),
                "observations": dict(self._observations),
                "shape": {c: dict(r) for c, r in self._shape.items()},
                "shape_observations": {c: dict(r) for c, r in self._shape_observations.items()},
                "rounds_without_draft": self._rounds_without_draft}

    def load_state(self, state: dict) -> None:
        self.measured = CostModel.from_dict(state["measured"])
        self._log_scale, self._observations = dict(state["log_scale"]), dict(state["observations"])
        self._shape = {c: dict(r) for c, r in state["shape"].items()}
        self._shape_observations = {c: dict(r) for c, r in state["shape_observations"].items()}
        self._rounds_without_draft = state.get("rounds_without_draft", 0)
        self._rebuild()

    def observe_draft(
        self, batch_sizes: list[int], candidates: int, seconds: float, featured: int, judged: int
    ) -> None:
        """A proposal: draft forwards over `batch_sizes` sequences each, `candidates` drawn, `featured` of them with
        their features computed and `judged` by a head, in `seconds`."""
        m = self.measured
        predicted = sum(m.draft_seconds(b) for b in batch_sizes)
        predicted += candidates * m.draw + featured * m.features + judged * m.head
        self._observe("draft", seconds, predicted, stale=self._rounds_without_draft)
        self._rounds_without_draft = 0
        self._rebuild()

    def observe_target(self, tokens: int, seconds: float, sequences: int = 1) -> None:
        """A target forward over `tokens` tokens of `sequences` sequences (their feeds together) in `seconds`."""
        predicted = self.measured.target_seconds(tokens, sequences)
        self._rounds_without_draft += 1
        self._observe("target", seconds, predicted)
        self._observe_shape(tokens, seconds, sequences)
        self._rebuild()  # once, after both the level and the shape moved
