"""Server pieces without a live server: response shapes, metrics folding, request schemas, sampling rules."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from engine.params import SamplingParams, generation_config_defaults
from engine.stats import RequestStats
from server import schemas
from server.metrics import ServerMetrics
from server.protocol import merged_stats, speculative_decoding
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


def test_metrics_count_expected_and_realized_rejections_and_lossy_requests():
    metrics = ServerMetrics()
    lossless, lossy = stats_record(), stats_record()
    lossless.record_verification(4, 3.25, True)
    lossy.over_acceptance = 0.1
    lossy.record_verification(2, 1.5, False)
    for stats in (lossless, lossy):
        metrics.observe_request(stats, "length")
    text = metrics.render().decode()

    def value(sample: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(sample + " ")).split()[-1])

    assert value('specdec_verified_positions_total{policy="specdec++"}') == 6
    assert value('specdec_expected_accepted_total{policy="specdec++"}') == pytest.approx(4.75)
    assert value('specdec_expected_rejections_total{policy="specdec++"}') == pytest.approx(1.25)
    assert value('specdec_rejections_total{policy="specdec++"}') == 1
    assert value('specdec_lossy_requests_total{policy="specdec++"}') == 1


def test_schemas_flag_unsupported_parameters():
    messages = [{"role": "user", "content": "hi"}]
    ok = ChatCompletionRequest(model="m", messages=messages, n=1, logprobs=False, response_format={"type": "text"})
    assert ok.unsupported() == []
    bad = ChatCompletionRequest(model="m", messages=messages, n=3, top_logprobs=2, tool_choice="auto")
    assert [p for p, _ in bad.unsupported()] == ["top_logprobs", "tool_choice"]  # top_logprobs needs logprobs
    for n in (0, 17):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(model="m", messages=messages, n=n)
    several = CompletionRequest(model="m", prompt=["a", "b"])
    assert several.unsupported() == [] and several.prompts() == ["a", "b"]  # one choice each
    assert CompletionRequest(model="m", prompt=[[1, 2], [3]]).prompts() == [[1, 2], [3]]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
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


ECHOED_ASSISTANT = {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
                    "function_call": None, "tool_calls": [], "name": "bot"}  # what the SDK's model_dump() echoes


def test_harmless_openai_fields_are_accepted_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(schemas, "_warned", set())  # as in a fresh server
    body = {"model": "m", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},
                                       ECHOED_ASSISTANT, {"role": "user", "content": "again"}],
            "service_tier": "auto", "prompt_cache_key": "k", "reasoning_effort": "low", "store": False,
            "metadata": {"a": "b"}, "parallel_tool_calls": True, "safety_identifier": "u1", "user": "u1",
            "tools": [], "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}
    with caplog.at_level("WARNING", logger="server.schemas"):
        for _ in range(2):
            request = ChatCompletionRequest.model_validate(body)
    assert request.unsupported() == []
    assert request.prompt()[2] == {"role": "assistant", "content": ""}
    warned = [r.getMessage() for r in caplog.records]
    for name in ("service_tier", "reasoning_effort", "stream_options.include_obfuscation", "messages[].refusal"):
        assert sum(f"'{name}'" in message for message in warned) == 1  # once per name, however often sent
    assert CompletionRequest.model_validate({"model": "m", "prompt": "a", "prompt_cache_key": "k"}).prompts() == ["a"]


@pytest.mark.parametrize(
    "message, param",
    [({"role": "assistant", "content": "x", "tool_calls": [{"id": "1", "type": "function"}]}, "messages.0.tool_calls"),
     ({"role": "assistant", "content": "x", "audio": {"id": "a1"}}, "messages.0.audio")],
)
def test_history_that_would_change_the_output_is_unsupported(message, param):
    assert [p for p, _ in ChatCompletionRequest(model="m", messages=[message]).unsupported()] == [param]
    modalities = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], modalities=["audio"])
    assert [p for p, _ in modalities.unsupported()] == ["modalities"]


@pytest.mark.parametrize(
    "message, kind",
    [({"role": "user", "content": None}, "content_required"), ({"role": "system"}, "content_required"),
     ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}, "unsupported_parameter"),
     ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "unsupported_parameter"),
     ({"role": "user", "content": [{"type": "file", "file": {}}]}, "unsupported_parameter"),
     ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}, "unsupported_parameter"),
     ({"role": "user", "content": [{"type": "text"}]}, "text_required")],
)
def test_message_content_rules(message, kind):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(model="m", messages=[message])
    assert info.value.errors()[0]["type"] == kind
    assert info.value.errors()[0]["loc"] == ("messages", 0, "content")


def test_sampling_params_edges():
    assert SamplingParams(top_k=-1).top_k == 0  # vLLM's "off"
    assert SamplingParams().max_tokens is None  # the engine fills in the rest of the context
    assert SamplingParams(seed=2**80).seed == 2**80 % 2**64 and SamplingParams(seed=-1).seed == 2**64 - 1
    for bad in ({"temperature": float("inf")}, {"temperature": float("nan")}, {"temperature": 2.5},
                {"top_p": float("nan")}, {"top_k": -2}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
    model = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    mixed = SamplingParams(temperature=0.0).with_defaults(model)
    assert (mixed.temperature, mixed.top_p, mixed.top_k) == (0.0, 0.8, 20)  # what the request set wins


def test_generation_config_defaults():
    from transformers import GenerationConfig

    config = GenerationConfig(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, eos_token_id=2)
    assert generation_config_defaults(config) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    assert generation_config_defaults(GenerationConfig(eos_token_id=2)) == {}
    assert generation_config_defaults(GenerationConfig(temperature=5.0)) == {}  # out of range: ignored
    assert generation_config_defaults(None) == {}


def test_merged_stats_add_up():
    one, two = stats_record(), stats_record()
    two.first_token_seconds, two.total_seconds = 0.2, 3.0
    merged = merged_stats([one, two])
    assert merged.generated_tokens == 16 and merged.prompt_tokens == 14 and merged.rounds == 8
    assert merged.candidate_lengths == one.candidate_lengths * 2
    assert (merged.first_token_seconds, merged.total_seconds) == (0.2, 3.0)
    assert merged_stats([one]) is one and merged_stats([None]) is None
    one.over_acceptance = two.over_acceptance = 0.1  # the request's epsilon, not a count
    assert merged_stats([one, two]).over_acceptance == 0.1 and not merged_stats([one, two]).lossless


def test_cors_is_off_by_default():
    from fastapi.testclient import TestClient

    from server.app import ServerSettings, create_app

    http = TestClient(create_app(ServerSettings(engine_config={})))  # no lifespan: no engine is spawned
    preflight = http.options("/v1/chat/completions", headers={"Origin": "https://ui.example",
                                                              "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in http.get("/version", headers={"Origin": "https://ui.example"}).headers


def test_an_unhandled_error_is_an_openai_500_with_the_request_id():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from server.middleware import install_middleware

    app = FastAPI()
    install_middleware(app, max_request_bytes=16, allowed_origins=None)

    @app.post("/boom")
    async def boom() -> None:
        raise RuntimeError("planted")

    http = TestClient(app, raise_server_exceptions=False)
    resp = http.post("/boom", headers={"x-request-id": "r-1"})
    assert resp.status_code == 500 and resp.headers["x-request-id"] == "r-1"
    assert resp.json()["error"]["code"] == "internal_error"
    too_big = http.post("/boom", content=b"x" * 17)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"


def test_metrics_fold_auto_levels_and_the_cost_model():
    metrics = ServerMetrics()
    stats = stats_record()
    stats.stop_levels = [0.2, 0.4, 0.65]
    metrics.observe_request(stats, "stop")
    metrics.observe_request(stats_record(), "stop")  # a fixed threshold: no levels
    costs = {"draft_step": 0.01, "draw": 0.0, "features": 0.0, "head": 0.0, "target": {1: 0.1, 64: 0.3},
             "draft_batch": {1: 0.01, 8: 0.02}, "machine": {}}
    metrics.set_costs(costs)
    metrics.set_costs({**costs, "target": {1: 0.2, 64: 0.6}}, draft_scale=1.5, target_scale=2.0, candidate_budget=3.5)
    text = metrics.render().decode()

    def value(sample: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(sample + " ")).split()[-1])

    assert value('specdec_auto_stop_level_count{policy="specdec++"}') == 3
    assert value('specdec_auto_stop_level_sum{policy="specdec++"}') == pytest.approx(1.25)
    assert value('specdec_auto_stop_level_bucket{le="0.5",policy="specdec++"}') == 2
    assert value('specdec_cost_target_forward_seconds{tokens="64"}') == pytest.approx(0.6)  # the latest model
    assert value('specdec_cost_draft_step_seconds{sequences="8"}') == pytest.approx(0.02)
    assert value('specdec_cost_scale{model="draft"}') == 1.5 and value('specdec_cost_scale{model="target"}') == 2.0
    assert value("specdec_auto_candidate_budget") == 3.5
