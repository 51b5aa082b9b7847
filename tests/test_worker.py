"""The engine process loop (engine/worker.py), run in a thread on plain queues with a tiny engine."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from conftest import random_head

from engine.llm_engine import LLMEngine
from engine.params import SamplingParams, SpecConfig
from engine.worker import EngineLoop, run_worker


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
    inbox.put({"type": "shutdown"})
    thread.join(timeout=30)
    assert not thread.is_alive()


def add(inbox, request_id: str, max_tokens: int = 12, spec: SpecConfig | None = None, **sampling) -> None:
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    inbox.put({"type": "add", "request_id": request_id, "prompt": "hello", "sampling": params.model_dump(),
               "spec": spec.model_dump() if spec else None})


def until(outbox, predicate, timeout: float = 30.0) -> list[dict]:
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
    return lambda m: m.get("request_id") == request_id and m["type"] == "event" and m["finished"]


def test_add_runs_to_completion_with_stats(loop):
    _, inbox, outbox = loop
    add(inbox, "a", max_tokens=12, spec=SpecConfig(policy="constant", k=3), ignore_eos=True)
    seen = until(outbox, final_of("a"))
    added = [m for m in seen if m["type"] == "added"]
    assert added == [{"type": "added", "request_id": "a", "prompt_tokens": 5}]
    events = [m for m in seen if m["type"] == "event"]
    assert sum(len(e["token_ids"]) for e in events) == 12
    final = events[-1]
    assert final["finish_reason"] == "length" and final["stats"]["generated_tokens"] == 12
    assert final["stats"]["policy"] == "constant"
    assert any(m["type"] == "load" and m["running"] == 1 for m in seen)


def test_request_errors_are_per_request(loop):
    _, inbox, outbox = loop
    add(inbox, "too-long", max_tokens=1000)
    inbox.put({"type": "add", "request_id": "bad", "prompt": "x", "sampling": {"temperature": -1}, "spec": None})
    add(inbox, "ok", max_tokens=4)
    seen = until(outbox, final_of("ok"))
    errors = {m["request_id"]: m for m in seen if m["type"] == "request_error"}
    assert errors["too-long"]["code"] == "context_length_exceeded" and errors["too-long"]["param"] == "max_tokens"
    assert errors["bad"]["code"] == "invalid_request"
    assert seen[-1]["stats"]["generated_tokens"] >= 1  # the engine kept serving


def test_abort_frees_the_request(loop):
    worker, inbox, outbox = loop
    add(inbox, "long", max_tokens=200, ignore_eos=True, spec=SpecConfig(policy="none"))
    until(outbox, lambda m: m.get("request_id") == "long" and m["type"] == "event")
    inbox.put({"type": "abort", "request_id": "long"})
    final = until(outbox, final_of("long"))[-1]
    assert final["finish_reason"] == "abort" and final["stats"]["generated_tokens"] < 200
    until(outbox, lambda m: m["type"] == "load" and m["running"] == 0)
    assert worker.engine.num_running == 0


def test_shutdown_cancels_what_is_left(tiny_pair, tokenizer):
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)})
    inbox, outbox = queue.Queue(), queue.Queue()
    add(inbox, "left", max_tokens=300, ignore_eos=True)
    inbox.put({"type": "shutdown"})
    EngineLoop(engine, inbox, outbox).run()  # returns: the loop ends on shutdown
    messages = list(outbox.queue)
    assert [m["finish_reason"] for m in messages if m["type"] == "event"] == ["abort"]
    assert engine.num_running == 0


def test_run_worker_reports_a_failed_start(tmp_path):
    outbox = queue.Queue()
    config = {"target": str(tmp_path / "missing"), "draft": "none", "head": "none", "dtype": "fp32"}
    run_worker(config, queue.Queue(), outbox)
    message = outbox.get_nowait()
    assert message["type"] == "error" and message["message"]
