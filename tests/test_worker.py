"""The engine process loop (engine/worker.py), run in a thread on plain queues with a tiny engine."""

from __future__ import annotations

import dataclasses
import pickle
import queue
import threading
import time

import pytest
from conftest import random_head
from tiny import CHEAP_DRAFT_COSTS
from transformers import GenerationConfig

import engine.worker as worker_module
from engine.events import (
    AbortRequest,
    AddRequest,
    Admitted,
    CalibrationReport,
    Detokenized,
    DetokenizeRequest,
    EngineCosts,
    EngineFailed,
    EngineLoad,
    RequestRejected,
    Shutdown,
    TokenEvent,
    Tokenized,
    TokenizeRequest,
)
from engine.llm_engine import LLMEngine, developer_as_system
from engine.params import SamplingParams, SpecConfig
from engine.tuning import budget_at
from engine.worker import EngineLoop, effective_sampling_defaults, run_worker


@pytest.fixture
def loop(tiny_pair, tokenizer):
    target, draft = tiny_pair
    heads = {"default": random_head(target.config.hidden_size)}
    engine = LLMEngine(target, draft, tokenizer, heads=heads, max_model_len=256)
    inbox, outbox = queue.Queue(), queue.Queue()
    worker = EngineLoop(engine, inbox, outbox)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    yield worker, inbox, outbox
    inbox.put(Shutdown())
    thread.join(timeout=30)
    assert not thread.is_alive()


def add(inbox, request_id: str, max_tokens: int = 12, spec: SpecConfig | None = None, prompt="hello",
        **sampling) -> None:
    inbox.put(AddRequest(request_id, prompt, SamplingParams(max_tokens=max_tokens, **sampling), spec))


def until(outbox, predicate, timeout: float = 30.0) -> list:
    """Messages up to and including the first that satisfies `predicate`."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = outbox.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(message)
        if predicate(message):
            return seen
    raise AssertionError(f"no such message; saw {seen}")


def final_of(request_id: str):
    return lambda m: isinstance(m, TokenEvent) and m.request_id == request_id and m.finished


def test_add_runs_to_completion_with_stats(loop):
    worker, inbox, outbox = loop
    add(inbox, "a", max_tokens=12, spec=SpecConfig(policy="constant", k=3), ignore_eos=True)
    seen = until(outbox, final_of("a"))
    expected_spec = worker.engine.default_spec.model_copy(update={"policy": "constant", "k": 3})
    assert [m for m in seen if isinstance(m, Admitted)] == [Admitted("a", 5, expected_spec)]
    events = [m for m in seen if isinstance(m, TokenEvent)]
    assert sum(len(e.token_ids) for e in events) == 12
    final = events[-1]
    assert final.finish_reason == "length" and final.stats.generated_tokens == 12
    assert final.stats.policy == "constant"
    assert any(isinstance(m, EngineLoad) and m.running == 1 for m in seen)


def test_calibration_is_reported_before_a_final_event(loop):
    """A request the head judged: the calibrators' state (with its labels) arrives before its final event,
    so the server's metrics hold them when the response does; a request nobody judged sends none."""
    _, inbox, outbox = loop
    add(inbox, "judged", max_tokens=16, spec=SpecConfig(policy="specdec++", threshold=0.5), ignore_eos=True)
    seen = until(outbox, final_of("judged"))
    reports = [m for m in seen if isinstance(m, CalibrationReport)]
    assert reports and isinstance(seen[-2], CalibrationReport)  # the last report just before the final event
    judged = seen[-1].stats.judged_candidates
    sampled = next(h for h in reports[-1].heads if (h.head, h.band) == ("default", "sampled"))
    assert judged > 0 and sampled.labels == judged and sum(count for count, _, _ in sampled.bins) == judged
    add(inbox, "target-alone", max_tokens=4, spec=SpecConfig(policy="none"))
    seen = until(outbox, final_of("target-alone"))
    assert not any(isinstance(m, CalibrationReport) for m in seen)


def test_a_partial_spec_runs_over_the_engine_default(tiny_pair, tokenizer):
    """A request's spec names only what it changes (even after pickling, as between processes);
    the engine merges it over its own default, once, and says what it runs with."""
    default = SpecConfig(policy="heuristic", k=2, bounds=(2, 9))
    engine = LLMEngine(*tiny_pair, tokenizer, default_spec=default)
    partial = pickle.loads(pickle.dumps(SpecConfig.model_validate({"k": 6})))
    inbox, outbox = queue.Queue(), queue.Queue()
    add(inbox, "partial", spec=partial)
    add(inbox, "default")
    inbox.put(Shutdown())
    EngineLoop(engine, inbox, outbox).run()
    admitted = {m.request_id: m.spec for m in outbox.queue if isinstance(m, Admitted)}
    assert admitted == {"partial": SpecConfig(policy="heuristic", k=6, bounds=(2, 9)), "default": default}


def test_request_errors_are_per_request(loop):
    _, inbox, outbox = loop
    add(inbox, "too-long", max_tokens=1000)
    add(inbox, "empty", prompt=[])
    add(inbox, "ok", max_tokens=4)
    seen = until(outbox, final_of("ok"))
    errors = {m.request_id: m for m in seen if isinstance(m, RequestRejected)}
    assert errors["too-long"].code == "context_length_exceeded" and errors["too-long"].param == "max_tokens"
    assert errors["empty"].param == "prompt"
    assert seen[-1].stats.generated_tokens >= 1  # the engine kept serving


def test_abort_frees_the_request(loop):
    worker, inbox, outbox = loop
    add(inbox, "long", max_tokens=200, ignore_eos=True, spec=SpecConfig(policy="none"))
    until(outbox, lambda m: isinstance(m, TokenEvent) and m.request_id == "long")
    inbox.put(AbortRequest("long"))
    final = until(outbox, final_of("long"))[-1]
    assert final.finish_reason == "abort" and final.stats.generated_tokens < 200
    until(outbox, lambda m: isinstance(m, EngineLoad) and m.running == 0)
    assert worker.engine.num_running == 0


def test_shutdown_cancels_what_is_left(tiny_pair, tokenizer):
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)})
    inbox, outbox = queue.Queue(), queue.Queue()
    add(inbox, "left", max_tokens=300, ignore_eos=True)
    inbox.put(Shutdown())
    EngineLoop(engine, inbox, outbox).run()  # returns: the loop ends on shutdown
    messages = list(outbox.queue)
    assert [m.finish_reason for m in messages if isinstance(m, TokenEvent)] == ["abort"]
    assert engine.num_running == 0


def test_run_worker_reports_a_failed_start(tmp_path):
    outbox = queue.Queue()
    config = {"target": str(tmp_path / "missing"), "draft": "none", "head": "none", "dtype": "fp32"}
    run_worker(config, queue.Queue(), outbox)
    message = outbox.get_nowait()
    assert isinstance(message, EngineFailed) and message.message


def test_max_tokens_unset_is_the_rest_of_the_context(loop):
    _, inbox, outbox = loop
    inbox.put(AddRequest("rest", "hello", SamplingParams(ignore_eos=True, seed=2**80), SpecConfig(policy="none")))
    final = until(outbox, final_of("rest"), timeout=120)[-1]
    assert final.finish_reason == "length" and final.stats.generated_tokens == 256 - 5  # max_model_len 256


def test_context_errors_name_what_the_client_sent(loop):
    """A prompt alone too long names the prompt (or messages); max_tokens is named only when it was sent."""
    _, inbox, outbox = loop
    long_text = "a" * 256
    inbox.put(AddRequest("prompt", long_text, SamplingParams()))
    inbox.put(AddRequest("messages", [{"role": "user", "content": long_text}], SamplingParams()))
    inbox.put(AddRequest("sent", "a" * 250, SamplingParams(max_tokens=7)))
    inbox.put(AddRequest("min", "a" * 250, SamplingParams(min_tokens=7)))  # max_tokens unset: 6 tokens of room
    inbox.put(AddRequest("fits", "a" * 250, SamplingParams(max_tokens=6, ignore_eos=True)))
    seen = until(outbox, final_of("fits"))
    errors = {m.request_id: (m.param, m.code) for m in seen if isinstance(m, RequestRejected)}
    assert errors == {"prompt": ("prompt", "context_length_exceeded"),
                      "messages": ("messages", "context_length_exceeded"),
                      "sent": ("max_tokens", "context_length_exceeded"),
                      "min": ("min_tokens", None)}
    assert seen[-1].stats.generated_tokens == 6


def test_developer_messages_become_system_where_the_template_lacks_them(tiny_pair, tokenizer):
    engine = LLMEngine(*tiny_pair, tokenizer)
    as_developer = engine.encode([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}])
    as_system = engine.encode([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert as_developer == as_system
    assert developer_as_system([{"role": "developer", "content": "x"}], "{{ 'developer' }}")[0]["role"] == "developer"


def test_unset_sampling_fields_take_the_models_generation_config(tiny_pair, tokenizer, monkeypatch):
    target, draft = tiny_pair
    monkeypatch.setattr(target, "generation_config", GenerationConfig(temperature=0.5, top_k=3, eos_token_id=0))
    engine = LLMEngine(target, draft, tokenizer)
    assert engine.sampling_defaults == {"temperature": 0.5, "top_k": 3}
    assert effective_sampling_defaults(engine.sampling_defaults) == {"temperature": 0.5, "top_p": 1.0, "top_k": 3}
    seen: dict[str, SamplingParams] = {}
    add_request = engine.add_request

    def spy(request_id, prompt, params, spec=None, n=1):
        seen[request_id] = params
        return add_request(request_id, prompt, params, spec, n)

    engine.add_request = spy
    inbox, outbox = queue.Queue(), queue.Queue()
    add(inbox, "unset", max_tokens=2)
    add(inbox, "set", max_tokens=2, temperature=1.0, top_k=-1)
    inbox.put(Shutdown())
    EngineLoop(engine, inbox, outbox).run()
    assert (seen["unset"].temperature, seen["unset"].top_k) == (0.5, 3)
    assert (seen["set"].temperature, seen["set"].top_k) == (1.0, 0)  # what the request set wins; -1 is off


def test_tokenizer_queries(loop, tokenizer):
    worker, inbox, outbox = loop
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    inbox.put(TokenizeRequest("text", "hello"))
    inbox.put(TokenizeRequest("chat", messages))
    inbox.put(DetokenizeRequest("back", tokenizer.encode("hello there")))
    inbox.put(DetokenizeRequest("bad", [10**6]))
    seen = until(outbox, lambda m: getattr(m, "request_id", None) == "bad")
    answers = {m.request_id: m for m in seen if isinstance(m, (Tokenized, Detokenized, RequestRejected))}
    assert answers["text"] == Tokenized("text", tokenizer.encode("hello"), 256)
    assert answers["chat"].tokens == worker.engine.encode(messages)  # what a chat request would run on
    assert answers["back"] == Detokenized("back", "hello there")
    assert answers["bad"].param == "tokens"


def test_busy_engine_reports_its_live_costs(tiny_pair, tokenizer, monkeypatch):
    """While it steps, the loop sends the refreshed cost model (at most every COSTS_REPORT_SECONDS)."""
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)},
                       costs=dataclasses.replace(CHEAP_DRAFT_COSTS, refresh=True))  # refreshed from its timings

    def serve(request_id: str) -> list:
        inbox, outbox = queue.Queue(), queue.Queue()
        thread = threading.Thread(target=EngineLoop(engine, inbox, outbox).run, daemon=True)
        thread.start()
        add(inbox, request_id, max_tokens=6, ignore_eos=True)  # the default spec: specdec++, threshold auto
        seen = until(outbox, final_of(request_id))
        inbox.put(Shutdown())
        thread.join(timeout=30)
        return [m for m in seen + list(outbox.queue) if isinstance(m, EngineCosts)]

    monkeypatch.setattr(worker_module, "COSTS_REPORT_SECONDS", 0.0)
    reports = serve("auto")
    assert reports, "no EngineCosts while busy"
    last, live = reports[-1], engine.tuning.costs
    assert last.costs == live.current.to_dict() and set(last.costs["target"]) == set(CHEAP_DRAFT_COSTS.target)
    assert (last.draft_scale, last.target_scale) == (live.draft_scale, live.target_scale) != (1.0, 1.0)
    # The budget at the load the rounds were priced at (one sequence here), from the live model.
    assert last.candidate_budget == budget_at(live.current, 1, engine.tuning.acceptance, 20)
    pickle.dumps(last)  # it crosses a process queue

    monkeypatch.setattr(worker_module, "COSTS_REPORT_SECONDS", 3600.0)
    assert serve("again") == []  # within the interval since the loop started (EngineReady had the model): none


def test_the_reported_budget_is_priced_at_the_recent_peak_load(tiny_pair, tokenizer, monkeypatch):
    """Between two bursts nothing runs, yet the next rounds are priced at the recent peak (`Scheduler.load`):
    the budget a dashboard shows is that one, not the one-sequence budget."""
    target, draft = tiny_pair
    costs = dataclasses.replace(CHEAP_DRAFT_COSTS, target={1: 0.1, 4: 0.1, 16: 0.4, 64: 2.0})
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)},
                       costs=costs)
    acceptance = engine.tuning.acceptance
    assert budget_at(costs, 2, acceptance, 20) != budget_at(costs, 1, acceptance, 20)  # the test can tell them apart
    for _ in range(2):
        engine.scheduler._recent_loads.append(2)
    monkeypatch.setattr(worker_module, "COSTS_REPORT_SECONDS", 0.0)
    outbox: queue.Queue = queue.Queue()
    EngineLoop(engine, queue.Queue(), outbox).report_costs()
    assert engine.num_running == 0 and outbox.get_nowait().candidate_budget == budget_at(costs, 2, acceptance, 20)
