"""Every Prometheus metric the server exports, defined once, fed from one stats record per request.

Paper ratios are ratios of these counters (sum over the `policy` label, or per policy):
  discard rate      = specdec_discarded_tokens_total / specdec_generated_tokens_total
  verification rate = specdec_target_calls_total / specdec_generated_tokens_total
  acceptance rate   = specdec_accepted_tokens_total / specdec_draft_tokens_total
Expected against realized rejections (Yin et al. 2024, Theorem 1; engine/stats.py):
  specdec_expected_rejections_total (= verified positions - expected accepted) next to specdec_rejections_total.
Requests served with lossy over-acceptance (output not the target's distribution) count in
specdec_lossy_requests_total as well as in the totals.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.stats import RequestStats

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

LENGTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)


class ServerMetrics:
    """One registry per server, so several apps (tests) can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, ["policy"]
        self.generated_tokens = Counter(
            "specdec_generated_tokens", "Completion tokens produced", p, registry=r
        )
        self.draft_tokens = Counter("specdec_draft_tokens", "Draft tokens proposed", p, registry=r)
        self.accepted_tokens = Counter(
            "specdec_accepted_tokens", "Proposed draft tokens that ended up in the completion", p, registry=r
        )
        self.discarded_tokens = Counter(
            "specdec_discarded_tokens", "Proposed draft tokens thrown away (rejected or cut)", p, registry=r
        )
        self.target_calls = Counter(
            "specdec_target_calls", "Target forward passes in the decode phase", p, registry=r
        )
        self.verified_positions = Counter(
            "specdec_verified_positions", "Candidate positions where the acceptance test ran", p, registry=r
        )
        self.expected_accepted = Counter(
            "specdec_expected_accepted", "Sum over verified positions of P(accepted): sum_v min(q, p + epsilon), "
            "epsilon 0 unless lossy", p, registry=r
        )
        self.expected_rejections = Counter(
            "specdec_expected_rejections", "Sum over verified positions of P(rejected): TV(p, q)", p, registry=r
        )
        self.rejections = Counter(
            "specdec_rejections", "Rounds whose acceptance test rejected a candidate", p, registry=r
        )
        self.lossy_requests = Counter(
            "specdec_lossy_requests", "Finished requests served with over-acceptance > 0: output not the target's "
            "distribution", p, registry=r
        )
        self.requests = Counter(
            "specdec_requests", "Finished requests by outcome (stop, length, abort, error, rejected)", ["status"],
            registry=r,
        )
        self.candidate_length = Histogram(
            "specdec_candidate_length", "Draft tokens proposed per speculation round", p,
            buckets=LENGTH_BUCKETS, registry=r,
        )
        self.accepted_length = Histogram(
            "specdec_accepted_length", "Draft tokens accepted per speculation round", p,
            buckets=LENGTH_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            "specdec_time_to_first_token_seconds", "Engine time from admission to the first token", p,
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inter_token_latency = Histogram(
            "specdec_inter_token_latency_seconds",
            "Mean time per output token after the first, observed once per token", p,
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.request_latency = Histogram(
            "specdec_request_latency_seconds", "Engine time from admission to the last token", p,
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.running_requests = Gauge("specdec_running_requests", "Requests the engine is running", registry=r)
        self.queue_depth = Gauge(
            "specdec_queue_depth", "Requests accepted by the server and not yet running in the engine", registry=r
        )

    def observe_request(self, stats: RequestStats | None, status: str) -> None:
        """Fold one request's final stats record into the metrics."""
        self.requests.labels(status=status).inc()
        if stats is None:
            return
        policy = stats.policy
        self.generated_tokens.labels(policy).inc(stats.generated_tokens)
        self.draft_tokens.labels(policy).inc(stats.proposed_tokens)
        self.accepted_tokens.labels(policy).inc(stats.accepted_tokens)
        self.discarded_tokens.labels(policy).inc(stats.discarded_tokens)
        self.target_calls.labels(policy).inc(stats.target_calls)
        self.verified_positions.labels(policy).inc(stats.verified_positions)
        self.expected_accepted.labels(policy).inc(stats.expected_accepted)
        self.expected_rejections.labels(policy).inc(max(stats.expected_rejections, 0.0))
        self.rejections.labels(policy).inc(stats.rejections)
        if not stats.lossless:
            self.lossy_requests.labels(policy).inc()
        for candidates, accepted in zip(stats.candidate_lengths, stats.accepted_lengths, strict=True):
            if candidates:  # rounds that proposed nothing (the target alone) say nothing about speculation
                self.candidate_length.labels(policy).observe(candidates)
                self.accepted_length.labels(policy).observe(accepted)
        first, generated, total = stats.first_token_seconds, stats.generated_tokens, stats.total_seconds
        if first is not None:
            self.time_to_first_token.labels(policy).observe(first)
            if generated > 1:
                per_token = max(total - first, 0.0) / (generated - 1)
                histogram = self.inter_token_latency.labels(policy)
                for _ in range(generated - 1):
                    histogram.observe(per_token)
        if generated:
            self.request_latency.labels(policy).observe(total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
