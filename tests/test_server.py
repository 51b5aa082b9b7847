"""The OpenAI-compatible server, live, on tiny random models, through the official `openai` SDK.

One server (api key set, --max-queue 3) serves the whole module; the engine runs in its own
spawned process. The engine-kill test runs last because it restarts that process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import openai
import pytest
from conftest import random_head
from live_server import DRAFT_NAME, TARGET_NAME, LiveServer, save_tiny_pair
from transformers import AutoTokenizer

API_KEY = "sk-test-key"
MAX_QUEUE = 3
CHAT = [{"role": "user", "content": "hello there"}]
LONG = 400  # tokens: long enough that a request is still running when the test acts on it


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_pair, tokenizer):
    target, draft = tiny_pair
    return save_tiny_pair(tmp_path_factory.mktemp("server-models"), target, draft, tokenizer, random_head(32, seed=3))


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    live = LiveServer(
        model_dirs, tmp_path_factory.mktemp("server-log") / "server.log",
        ("--api-key", API_KEY, "--max-queue", str(MAX_QUEUE)),
    )
    try:
        live.wait_healthy()
        yield live
    finally:
        code = live.stop()
        assert code in (0, 130, -signal.SIGINT), live.log()  # 130: uvicorn re-raises the SIGINT it handled


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def saved_tokenizer(model_dirs):
    return AutoTokenizer.from_pretrained(model_dirs["target"])


def metric(server, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` (optionally only those whose label set contains `labels`)."""
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def headers() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def open_stream(server, http: httpx.Client, max_tokens: int = LONG):
    """A long streaming completion opened by hand; returns (context manager, response, line iterator)."""
    body = {"model": TARGET_NAME, "prompt": "hello", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "specdec": {"policy": "none"}}
    ctx = http.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers())
    response = ctx.__enter__()
    assert response.status_code == 200, (response.read(), server.log())
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    assert json.loads(first[6:])["object"] == "text_completion"
    return ctx, response, lines


# ----- happy paths ------------------------------------------------------------------------
def test_health_models_and_metrics_are_open(server, client):
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # no key needed
    models = client.models.list()
    assert [m.id for m in models.data] == [TARGET_NAME]
    assert models.data[0].model_extra["specdec"]["draft"] == DRAFT_NAME


def test_chat_completion_usage_and_stats(client, saved_tokenizer):
    resp = client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_tokens=24, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    rendered = saved_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt_ids = saved_tokenizer.encode(rendered, add_special_tokens=False)
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    specdec = resp.model_extra["specdec"]
    assert specdec["policy"] == "specdec++" and specdec["generated_tokens"] == resp.usage.completion_tokens
    if choice.finish_reason == "length":
        assert resp.usage.completion_tokens == 24
    vllm = resp.model_extra["metrics"]["speculative_decoding"]
    assert vllm["num_draft_tokens"] == specdec["proposed_tokens"]
    assert vllm["num_accepted_draft_tokens"] == specdec["accepted_tokens"]
    assert sum(vllm["acceptance_histogram"]) == vllm["num_spec_steps"] > 0
    assert vllm["draft_acceptance_rate"] == pytest.approx(specdec["acceptance_rate"])


def test_completion_and_lossless_policies(client, saved_tokenizer):
    """Greedy output is the target's whatever the per-request policy: the specdec extension reaches the engine."""
    texts = {}
    for policy in ("none", "constant", "specdec++"):
        resp = client.completions.create(
            model=TARGET_NAME, prompt="the quick brown fox", max_tokens=30, temperature=0,
            extra_body={"specdec": {"policy": policy, "k": 3}},
        )
        assert resp.usage.prompt_tokens == len(saved_tokenizer.encode("the quick brown fox"))
        stats = resp.model_extra["specdec"]
        assert stats["policy"] == policy and stats["config"]["policy"] == policy
        if policy == "none":
            assert stats["proposed_tokens"] == 0
        if policy == "constant":
            assert max(stats["candidate_lengths"]) <= 3
        texts[policy] = resp.choices[0].text
    assert texts["none"] == texts["constant"] == texts["specdec++"]


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model=TARGET_NAME, messages=CHAT, max_tokens=40, temperature=0.8, seed=7)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content  # same seed, same tokens
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == full.choices[0].finish_reason
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert usage_chunk.model_extra["metrics"]["speculative_decoding"]["num_spec_steps"] > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_concurrent_requests_get_their_own_results(client):
    """Events are routed by request id: concurrent (batched) greedy requests equal the sequential ones."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["abc", "the quick", "hello world"][:MAX_QUEUE]

    def run(i: int) -> str:
        resp = client.completions.create(model=TARGET_NAME, prompt=prompts[i], max_tokens=10 + 5 * i, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert resp.usage.completion_tokens == 10 + 5 * i
        return resp.choices[0].text

    sequential = [run(i) for i in range(len(prompts))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(run, range(len(prompts))))
    assert concurrent == sequential


def test_completion_stream_without_usage(client):
    chunks = list(client.completions.create(model=TARGET_NAME, prompt="abc", max_tokens=10, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "specdec" in chunks[-1].model_extra  # the stats ride on the finish chunk
    assert all(c.usage is None for c in chunks)


def test_stop_strings(client):
    base = client.completions.create(model=TARGET_NAME, prompt="hello", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = base.choices[0].text
    assert len(text) >= 10
    stop = text[6:8]
    expected = text[: text.find(stop)]
    for value in (stop, [stop, "zzzzzz"]):
        resp = client.completions.create(model=TARGET_NAME, prompt="hello", max_tokens=40, temperature=0,
                                         stop=value, extra_body={"ignore_eos": True})
        assert resp.choices[0].text == expected
        assert resp.choices[0].finish_reason == "stop"


def test_max_completion_tokens(client):
    resp = client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_completion_tokens=5,
                                          extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 5 and resp.choices[0].finish_reason == "length"


# ----- errors -----------------------------------------------------------------------------
def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"n": 2}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"specdec": {"threshold": 2.0}}}, "specdec.threshold"),
        ({"extra_body": {"specdec": {"policy": "magic"}}}, "specdec.policy"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ],
)
def test_bad_parameters_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TARGET_NAME, messages=CHAT, **kwargs)
    assert error_of(info.value)["param"] == param


def test_empty_messages_unknown_model_and_context(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TARGET_NAME, messages=[])
    assert error_of(info.value)["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert error_of(info.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TARGET_NAME, prompt="hello", max_tokens=100_000)
    assert error_of(info.value)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:  # the same check before a stream starts
        client.completions.create(model=TARGET_NAME, prompt="hello", max_tokens=100_000, stream=True)
    assert error_of(info.value)["code"] == "context_length_exceeded"


def test_invalid_json_is_400(server):
    resp = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers={
        **headers(), "Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_auth(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    resp = httpx.post(f"{server.url}/v1/completions", json={"model": TARGET_NAME, "prompt": "a"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


# ----- cancellation, back-pressure, recovery ----------------------------------------------
def test_disconnect_cancels_in_engine(server):
    aborted = metric(server, "specdec_requests_total", 'status="abort"')
    with httpx.Client(timeout=60) as http:
        ctx, _, _ = open_stream(server, http)
        wait_for(lambda: metric(server, "specdec_running_requests") == 1, what="the request to run")
        ctx.__exit__(None, None, None)  # drop the connection mid-stream
    wait_for(lambda: metric(server, "specdec_requests_total", 'status="abort"') == aborted + 1, what="the abort")
    assert metric(server, "specdec_running_requests") == 0


def test_disconnect_cancels_non_streaming_too(server):
    aborted = metric(server, "specdec_requests_total", 'status="abort"')
    body = {"model": TARGET_NAME, "prompt": "hello", "max_tokens": LONG, "ignore_eos": True,
            "specdec": {"policy": "none"}}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/completions", json=body, headers=headers(), timeout=0.3)
    wait_for(lambda: metric(server, "specdec_requests_total", 'status="abort"') == aborted + 1, what="the abort")
    assert metric(server, "specdec_running_requests") == 0


def test_full_queue_is_429(server, client):
    with httpx.Client(timeout=60) as http:
        streams = [open_stream(server, http) for _ in range(MAX_QUEUE)]
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=TARGET_NAME, prompt="one more", max_tokens=5)
        assert info.value.response.headers["retry-after"] == "1"
        assert error_of(info.value)["code"] == "queue_full"
        for ctx, _, _ in streams:
            ctx.__exit__(None, None, None)
    wait_for(lambda: metric(server, "specdec_running_requests") == 0, what="the aborts")
    assert client.completions.create(model=TARGET_NAME, prompt="again", max_tokens=3).usage.completion_tokens >= 1


def test_engine_killed_mid_run_comes_back(server, client):
    old_pid = server.engine_pid()
    with httpx.Client(timeout=60) as http:
        ctx, _, lines = open_stream(server, http)
        os.kill(old_pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
        ctx.__exit__(None, None, None)
    errors = [json.loads(line[6:])["error"] for line in rest if line.startswith("data: {\"error\"")]
    assert errors and errors[0]["code"] == "engine_unavailable"  # the in-flight request was told
    assert rest[-1] == "data: [DONE]"
    statuses = []
    wait_for(lambda: statuses.append(httpx.get(f"{server.url}/health").status_code) or statuses[-1] == 200,
             timeout=180, what="the engine to come back")
    assert 503 in statuses  # it said so while restarting
    assert server.engine_pid() != old_pid
    assert httpx.get(f"{server.url}/health").json()["restarts"] == 1
    resp = client.completions.create(model=TARGET_NAME, prompt="back again", max_tokens=5)
    assert resp.usage.completion_tokens >= 1
