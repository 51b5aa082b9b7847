"""Server pieces without a live server: response shapes, metrics folding, request schemas."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from engine.stats import RequestStats
from server.metrics import ServerMetrics
from server.protocol import speculative_decoding
from server.schemas import ChatCompletionRequest, CompletionRequest


def stats_record() -> RequestStats:
    stats = RequestStats(policy="specdec++", prompt_tokens=7)
    for candidates, accepted in ((3, 3), (4, 1), (2, 0), (0, 0)):
        stats.record_round(candidates, accepted)
    stats.generated_tokens = 4 + 2 + 1 + 1  # accepted + one target token per round
    stats.first_token_seconds, stats.total_seconds = 0.5, 1.2
    return stats


def test_speculative_decoding_matches_vllm_definitions():
    out = speculative_decoding(stats_record())
    assert out == {
        "mean_acceptance_length": 1 + 4 / 3,  # 1 + accepted drafts per verify step (steps that proposed)
        "draft_acceptance_rate": 4 / 9,
        "acceptance_histogram": [1, 1, 0, 1, 0],  # steps that accepted exactly j drafts, j = 0..4
        "num_spec_steps": 3,
        "num_accepted_draft_tokens": 4,
        "num_draft_tokens": 9,
        "num_spec_tokens": 4,
    }


def test_metrics_fold_one_stats_record():
    metrics = ServerMetrics()
    metrics.observe_request(stats_record(), "length")
    metrics.observe_request(None, "error")
    text = metrics.render().decode()

    def value(sample: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(sample + " ")).split()[-1])

    assert value('specdec_generated_tokens_total{policy="specdec++"}') == 8
    assert value('specdec_draft_tokens_total{policy="specdec++"}') == 9
    assert value('specdec_accepted_tokens_total{policy="specdec++"}') == 4
    assert value('specdec_discarded_tokens_total{policy="specdec++"}') == 5
    assert value('specdec_target_calls_total{policy="specdec++"}') == 4
    assert value('specdec_requests_total{status="length"}') == 1
    assert value('specdec_requests_total{status="error"}') == 1
    assert value('specdec_candidate_length_count{policy="specdec++"}') == 3  # the round without drafts is left out
    assert value('specdec_inter_token_latency_seconds_count{policy="specdec++"}') == 7
    assert value('specdec_inter_token_latency_seconds_sum{policy="specdec++"}') == pytest.approx(0.7)
    assert value('specdec_time_to_first_token_seconds_sum{policy="specdec++"}') == pytest.approx(0.5)


def test_schemas_flag_unsupported_parameters():
    messages = [{"role": "user", "content": "hi"}]
    ok = ChatCompletionRequest(model="m", messages=messages, n=1, logprobs=False, response_format={"type": "text"})
    assert ok.unsupported() == []
    bad = ChatCompletionRequest(model="m", messages=messages, n=3, top_logprobs=2, tool_choice="auto")
    assert [p for p, _ in bad.unsupported()] == ["n", "top_logprobs", "tool_choice"]  # top_logprobs needs logprobs
    assert CompletionRequest(model="m", prompt=["a", "b"]).unsupported()[0][0] == "prompt"
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "tool", "content": "x"}])


def test_sampling_comes_from_engine_params():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                 max_tokens=9, max_completion_tokens=5, stop="x", temperature=0)
    sampling = body.to_sampling()
    assert sampling.max_tokens == 5 and sampling.stop == ("x",) and sampling.greedy
    assert body.prompt() == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[], top_p=1.5).to_sampling()


def test_specdec_is_validated_at_the_edge_as_a_partial_spec():
    spec = CompletionRequest(model="m", prompt="a", specdec={"k": 6, "bounds": [2, 9]}).to_spec()
    assert spec.model_fields_set == {"k", "bounds"} and spec.bounds == (2, 9)  # the engine merges the rest
    assert CompletionRequest(model="m", prompt="a").to_spec() is None
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="a", specdec={"bounds": [9, 2]}).to_spec()


def test_server_never_imports_torch():
    code = "import sys, server.app, specdecpp.commands.serve; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
