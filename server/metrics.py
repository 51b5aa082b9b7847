"""Every Prometheus metric the server exports, defined once, fed from one stats record per request.

Paper ratios are ratios of these counters (sum over the `policy` label, or per policy):
  discard rate      = specdec_discarded_tokens_total / specdec_generated_tokens_total
  verification rate = specdec_target_calls_total / specdec_generated_tokens_total
  acceptance rate   = specdec_accepted_tokens_total / specdec_draft_tokens_total
The specdec_cost_* gauges are the engine's cost model (engine/costs.py): measured at start, then
refreshed from the engine's EngineCosts reports while it serves.
Expected against realized rejections (Yin et al. 2024, Theorem 1; engine/stats.py):
  specdec_expected_rejections_total (= verified positions - expected accepted) next to specdec_rejections_total.
Requests served with lossy over-acceptance (output not the target's distribution) count in
specdec_lossy_requests_total as well as in the totals.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.events import CalibrationReport
from engine.stats import RequestStats

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

LENGTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
LEVEL_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # a probability in (0, 1)


# The per-policy counters each finished request adds its stats to: metric name (specdec_NAME_total), the
# RequestStats field, help.
POLICY_COUNTERS = (
    ("generated_tokens", "generated_tokens", "Completion tokens produced"),
    ("draft_tokens", "proposed_tokens", "Draft tokens proposed"),
    ("accepted_tokens", "accepted_tokens", "Proposed draft tokens that ended up in the completion"),
    ("discarded_tokens", "discarded_tokens", "Proposed draft tokens thrown away (rejected or cut)"),
    ("target_calls", "target_calls", "Target forward passes in the decode phase"),
    ("verified_positions", "verified_positions", "Candidate positions where the acceptance test ran"),
    ("expected_accepted", "expected_accepted",
     "Sum over verified positions of P(accepted): sum_v min(q, p + epsilon), epsilon 0 unless lossy"),
    ("expected_rejections", "expected_rejections", "Sum over verified positions of P(rejected): TV(p, q)"),
    ("rejections", "rejections", "Rounds whose acceptance test rejected a candidate"),
)


class ServerMetrics:
    """One registry per server, so several apps (tests) can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, ["policy"]
        self.policy_counters = {
            field: Counter(f"specdec_{name}", help_text, p, registry=r) for name, field, help_text in POLICY_COUNTERS
        }
        self.lossy_requests = Counter(
            "specdec_lossy_requests", "Finished requests served with over-acceptance > 0: output not the target's "
            "distribution", p, registry=r
        )
        self.requests = Counter(
            "specdec_requests", "Finished engine requests by outcome (stop, length, abort, error, "
            "rejected): one per choice, so an API request with n choices counts n", ["status"],
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
        self.auto_stop_level = Histogram(
            "specdec_auto_stop_level", "Stop level the engine chose per round for threshold auto (specdec++)", p,
            buckets=LEVEL_BUCKETS, registry=r,
        )
        self.auto_candidate_budget = Gauge(
            "specdec_auto_candidate_budget",
            "Candidates per round the cost model lets a sequence propose at the current batch size", registry=r,
        )
        self.cost_target_forward = Gauge(
            "specdec_cost_target_forward_seconds", "Cost model: one target forward over this many tokens", ["tokens"],
            registry=r,
        )
        self.cost_draft_step = Gauge(
            "specdec_cost_draft_step_seconds", "Cost model: one draft forward over this many sequences", ["sequences"],
            registry=r,
        )
        self.cost_scale = Gauge(
            "specdec_cost_scale", "Observed over measured cost, smoothed (the live model is the measured one times it)",
            ["model"], registry=r,
        )

        calibration = ["head", "band"]
        self.head_calibration_error = Gauge(
            "specdec_head_calibration_error",
            "Expected calibration error of the acceptance head's P(accepted) over its recent judged candidates",
            calibration, registry=r,
        )
        self.head_calibration_scale = Gauge(
            "specdec_head_calibration_scale", "Online calibrator's A in P(accepted) = sigmoid(A z + B)", calibration,
            registry=r,
        )
        self.head_calibration_bias = Gauge(
            "specdec_head_calibration_bias", "Online calibrator's B in P(accepted) = sigmoid(A z + B)", calibration,
            registry=r,
        )
        self.head_calibration_labels = Gauge(
            "specdec_head_calibration_labels", "Judged candidates labelled since the engine started", calibration,
            registry=r,
        )
        reliability = [*calibration, "bin"]
        self.head_reliability_count = Gauge(
            "specdec_head_reliability_count", "Recent judged candidates by bin of predicted P(accepted)", reliability,
            registry=r,
        )
        self.head_reliability_predicted = Gauge(
            "specdec_head_reliability_predicted", "Mean predicted P(accepted) of a bin's recent judged candidates",
            reliability, registry=r,
        )
        self.head_reliability_realized = Gauge(
            "specdec_head_reliability_realized", "Mean exact acceptance a = min(1, p/q) of a bin's recent judged "
            "candidates", reliability, registry=r,
        )

    def observe_calibration(self, report: CalibrationReport) -> None:
        """Set the calibration gauges from the engine's latest report (engine/calibration.py)."""
        for head in report.heads:
            labels = {"head": head.head, "band": head.band}
            self.head_calibration_scale.labels(**labels).set(head.scale)
            self.head_calibration_bias.labels(**labels).set(head.bias)
            self.head_calibration_labels.labels(**labels).set(head.labels)
            if head.calibration_error is None:
                continue
            self.head_calibration_error.labels(**labels).set(head.calibration_error)
            width = 1.0 / len(head.bins)
            for i, (count, predicted, realized) in enumerate(head.bins):
                bin_labels = {**labels, "bin": f"{i * width:.1f}-{(i + 1) * width:.1f}"}
                self.head_reliability_count.labels(**bin_labels).set(count)
                self.head_reliability_predicted.labels(**bin_labels).set(predicted)
                self.head_reliability_realized.labels(**bin_labels).set(realized)

    def observe_request(self, stats: RequestStats | None, status: str) -> None:
        """Fold one request's final stats record into the metrics."""
        self.requests.labels(status=status).inc()
        if stats is None:
            return
        policy = stats.policy
        for field, counter in self.policy_counters.items():
            counter.labels(policy).inc(max(getattr(stats, field), 0))  # a float sum may round below 0
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
        for level in stats.stop_levels:
            self.auto_stop_level.labels(policy).observe(level)

    def set_costs(self, costs: dict, draft_scale: float = 1.0, target_scale: float = 1.0,
                  candidate_budget: int | None = None) -> None:
        """The cost gauges from a CostModel.to_dict() (the measured model at start, the live one later), and
        the candidate budget it gives at the current batch size when the engine reported one."""
        for tokens, seconds in costs["target"].items():
            self.cost_target_forward.labels(tokens=str(tokens)).set(seconds)
        for sequences, seconds in (costs.get("draft_batch") or {1: costs["draft_step"]}).items():
            self.cost_draft_step.labels(sequences=str(sequences)).set(seconds)
        self.cost_scale.labels(model="draft").set(draft_scale)
        self.cost_scale.labels(model="target").set(target_scale)
        if candidate_budget is not None:
            self.auto_candidate_budget.set(candidate_budget)

    def render(self) -> bytes:
        return generate_latest(self.registry)
