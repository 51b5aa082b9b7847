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
from live_server import DRAFT_NAME, SEED_REPRODUCIBLE, TARGET_NAME, LiveServer, save_tiny_pair
from tiny import CHEAP_DRAFT_COSTS
from transformers import AutoTokenizer

import specdecpp

API_KEY = "sk-test-key"
MAX_QUEUE = 3
CHAT = [{"role": "user", "content": "hello there"}]
LONG = 400  # tokens: long enough that a request is still running when the test acts on it
ALLOWED_ORIGIN = "https://ui.example"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_pair, tokenizer):
    target, draft = tiny_pair
    return save_tiny_pair(tmp_path_factory.mktemp("server-models"), target, draft, tokenizer, random_head(32, seed=3))


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    live = LiveServer(
        model_dirs, tmp_path_factory.mktemp("server-log") / "server.log",
        ("--api-key", API_KEY, "--max-queue", str(MAX_QUEUE), "--allowed-origins", ALLOWED_ORIGIN),
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
    # The server's default: specdec++ at threshold auto, the levels the engine chose reported per round.
    levels = specdec["stop_levels"]
    assert specdec["config"]["threshold"] == "auto" and 0 < len(levels) <= specdec["rounds"]
    assert all(0 < level < 1 for level in levels)
    assert specdec["mean_stop_level"] == pytest.approx(sum(levels) / len(levels))


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


def test_head_calibration_metrics_after_a_request(server, client):
    """The engine reports its online calibrators before a request's final event: once the response is back,
    /metrics has the head's calibration error, A and B, and a reliability table holding the judged candidates."""
    resp = client.completions.create(
        model=TARGET_NAME, prompt="hello", max_tokens=40, temperature=0,
        extra_body={"specdec": {"policy": "specdec++", "threshold": 0.5}, "ignore_eos": True},
    )
    stats = resp.model_extra["specdec"]
    assert stats["judged_candidates"] > 0
    assert 0.0 <= stats["mean_predicted_acceptance"] <= 1.0 and 0.0 <= stats["mean_realized_acceptance"] <= 1.0
    greedy = 'band="greedy",head="default"'  # the exposition sorts labels by name
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("error", "scale", "bias", "labels"):
        assert re.search(rf"^specdec_head_calibration_{name}\{{{greedy}\}} \S+$", text, re.M), name
    assert re.search(r'^specdec_head_reliability_realized\{band="greedy",bin="0.9-1.0",head="default"\} \S+$',
                     text, re.M)
    labels = metric(server, "specdec_head_calibration_labels", greedy)
    assert labels >= stats["judged_candidates"]
    assert metric(server, "specdec_head_reliability_count", 'band="greedy"') == labels  # all: fewer than the window
    assert 0.0 <= metric(server, "specdec_head_calibration_error", greedy) <= 1.0


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model=TARGET_NAME, messages=CHAT, max_tokens=40, temperature=0.8, seed=7,
                  extra_body={"specdec": SEED_REPRODUCIBLE})
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
        ({"n": 17}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"specdec": {"threshold": 2.0}}}, "specdec.threshold"),
        ({"extra_body": {"specdec": {"policy": "magic"}}}, "specdec.policy"),
        ({"extra_body": {"specdec": {"over_acceptance": -0.1}}}, "specdec.over_acceptance"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ],
)
def test_bad_parameters_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TARGET_NAME, messages=CHAT, **kwargs)
    assert error_of(info.value)["param"] == param


def test_lossy_over_acceptance_is_refused_without_the_server_flag(client):
    """epsilon > 0 changes the output distribution: this server was started without --max-over-acceptance."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_tokens=4,
                                       extra_body={"specdec": {"policy": "constant", "over_acceptance": 0.05}})
    assert error_of(info.value)["param"] == "specdec.over_acceptance"
    resp = client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_tokens=4)  # still serving
    assert resp.model_extra["specdec"]["lossless"] is True


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


# ----- OpenAI and vLLM edge cases -----------------------------------------------------------
MAX_MODEL_LEN = 512  # the tiny target's context


def test_developer_message_is_a_system_message(client):
    """The tiny template does not know `developer`: such messages reach it as `system`, not dropped."""
    replies = {}
    for role in ("developer", "system"):
        messages = [{"role": role, "content": "be brief"}, *CHAT]
        replies[role] = client.chat.completions.create(model=TARGET_NAME, messages=messages, max_tokens=8,
                                                       temperature=0)
    assert replies["developer"].usage.prompt_tokens == replies["system"].usage.prompt_tokens
    assert replies["developer"].usage.prompt_tokens > client.chat.completions.create(
        model=TARGET_NAME, messages=CHAT, max_tokens=1).usage.prompt_tokens
    assert replies["developer"].choices[0].message.content == replies["system"].choices[0].message.content


def test_max_tokens_unset_is_the_rest_of_the_context(client):
    """No phantom 256: without max_tokens a completion may fill the context, for chat and completions,
    and a prompt within 256 tokens of the limit is served."""
    messages = [{"role": "user", "content": "a" * 470}]
    chat = client.chat.completions.create(model=TARGET_NAME, messages=messages, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == MAX_MODEL_LEN
    text = client.completions.create(model=TARGET_NAME, prompt="b" * 490, extra_body={"ignore_eos": True})
    assert text.usage.completion_tokens == MAX_MODEL_LEN - 490 and text.choices[0].finish_reason == "length"


def test_context_errors_name_what_was_sent(client):
    with pytest.raises(openai.BadRequestError) as info:  # the prompt alone is too long
        client.chat.completions.create(model=TARGET_NAME, messages=[{"role": "user", "content": "a" * 600}])
    assert (error_of(info.value)["param"], error_of(info.value)["code"]) == ("messages", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TARGET_NAME, prompt="a" * 600)
    assert (error_of(info.value)["param"], error_of(info.value)["code"]) == ("prompt", "context_length_exceeded")
    for name in ("max_tokens", "max_completion_tokens"):  # the limit is named when it was sent, as it was sent
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=TARGET_NAME, messages=[{"role": "user", "content": "a" * 400}],
                                           **{name: 200})
        assert (error_of(info.value)["param"], error_of(info.value)["code"]) == (name, "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_completion_tokens=0)
    assert error_of(info.value)["param"] == "max_completion_tokens"


def test_harmless_openai_fields_and_echoed_history_are_accepted(client):
    first = client.chat.completions.create(
        model=TARGET_NAME, messages=CHAT, max_completion_tokens=4, service_tier="auto", prompt_cache_key="k1",
        reasoning_effort="low", store=False, metadata={"team": "a"}, parallel_tool_calls=False,
        safety_identifier="user-1", user="user-1", tools=[], stream=False,
    )
    history = [*CHAT, first.choices[0].message.model_dump(), {"role": "user", "content": "and then?"}]
    assert {"refusal", "annotations", "audio", "tool_calls"} <= set(history[1])  # what the SDK echoes
    again = client.chat.completions.create(model=TARGET_NAME, messages=history, max_tokens=4)
    assert again.usage.prompt_tokens > first.usage.prompt_tokens
    chunks = list(client.chat.completions.create(
        model=TARGET_NAME, messages=CHAT, max_tokens=4, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False}))
    assert chunks[-1].usage.completion_tokens >= 1


@pytest.mark.parametrize(
    "kwargs, param",
    [({"modalities": ["text", "audio"]}, "modalities"),
     ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
     ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
     ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
     ({"seed": None, "extra_body": {"top_k": -2}}, "top_k"),
     ({"temperature": 2.5}, "temperature")],
)
def test_what_would_change_the_output_is_still_400(client, kwargs, param):
    kwargs = {"messages": CHAT, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TARGET_NAME, max_tokens=4, **kwargs)
    assert error_of(info.value)["param"] == param


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
])
def test_non_text_content_parts_are_400(client, part):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TARGET_NAME, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "look"}, part]}])
    error = error_of(info.value)
    assert error["param"] == "messages.0.content" and "this model accepts only text content parts" in error["message"]


def test_non_finite_and_huge_numbers(server, client):
    for body in (b'"temperature": 1e999', b'"temperature": NaN', b'"top_p": Infinity', b'"top_p": -1e999'):
        resp = httpx.post(f"{server.url}/v1/completions", headers={**headers(), "Content-Type": "application/json"},
                          content=b'{"model": "%s", "prompt": "a", "max_tokens": 2, %s}' % (TARGET_NAME.encode(), body))
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == body.split(b'"')[1].decode()
    kwargs = dict(model=TARGET_NAME, prompt="abc", max_tokens=6, temperature=1.0,
                  extra_body={"specdec": SEED_REPRODUCIBLE})
    big = client.completions.create(**kwargs, seed=2**80)  # reduced modulo 2**64, deterministically
    assert big.choices[0].text == client.completions.create(**kwargs, seed=2**80).choices[0].text
    assert big.choices[0].text == client.completions.create(**kwargs, seed=2**80 % 2**64).choices[0].text


def test_top_k_minus_one_is_off(client):
    kwargs = dict(model=TARGET_NAME, prompt="the quick", max_tokens=12, temperature=1.0, seed=11)
    plain = client.completions.create(**kwargs, extra_body={"specdec": SEED_REPRODUCIBLE}).choices[0].text
    for top_k in (-1, 0):
        body = {"top_k": top_k, "specdec": SEED_REPRODUCIBLE}
        assert client.completions.create(**kwargs, extra_body=body).choices[0].text == plain


def test_several_prompts_get_one_choice_each(client):
    prompts = ["abc", "the quick", "hello world"]
    kwargs = dict(model=TARGET_NAME, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    singles = [client.completions.create(prompt=p, **kwargs) for p in prompts]
    batch = client.completions.create(prompt=prompts, **kwargs)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == 24 and batch.model_extra["specdec"]["generated_tokens"] == 24
    streamed = ["", "", ""]
    chunks = list(client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    for chunk in chunks[:-1]:
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [c.text for c in batch.choices]
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 3
    assert chunks[-1].usage.total_tokens == batch.usage.total_tokens
    ids = client.completions.create(prompt=[[1, 2, 3], [4, 5]], **kwargs)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5


def test_request_id_is_echoed_or_made_up(server):
    with httpx.Client(base_url=server.url, headers=headers(), timeout=60) as http:
        mine = http.post("/v1/completions", json={"model": TARGET_NAME, "prompt": "a", "max_tokens": 2},
                         headers={"x-request-id": "trace-42"})
        assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42"
        made_up = [http.get("/health"), http.post("/v1/completions", json={"model": "nope", "prompt": "a"}),
                   httpx.get(f"{server.url}/v1/models")]  # 200, 404, 401
        assert [r.status_code for r in made_up] == [200, 404, 401]
        assert all(re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]) for r in made_up)
        with http.stream("POST", "/v1/completions", json={"model": TARGET_NAME, "prompt": "a", "max_tokens": 2,
                                                         "stream": True}, headers={"x-request-id": "s-1"}) as stream:
            assert stream.headers["x-request-id"] == "s-1"
    assert "x-request-id trace-42" in server.log()  # the logs tie the client's id to ours


def test_request_body_limit_is_413_before_parsing(server):
    big = b'{"model": "%s", "prompt": "%s"}' % (TARGET_NAME.encode(), b"a" * (9 * 1024 * 1024))
    for content in (big, iter([big[:1024], big[1024:]])):  # with Content-Length, and chunked without it
        resp = httpx.post(f"{server.url}/v1/completions", content=content,
                          headers={**headers(), "Content-Type": "application/json"}, timeout=60)
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "request_too_large" and resp.headers["x-request-id"]


def test_cors_for_allowed_origins(server):
    preflight = {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    resp = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = httpx.options(f"{server.url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.test"})
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.get(f"{server.url}/version", headers={"Origin": ALLOWED_ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()


def test_version_tokenize_detokenize(server, client, saved_tokenizer):
    assert httpx.get(f"{server.url}/version").json() == {"version": specdecpp.__version__}
    messages = [{"role": "developer", "content": "be brief"}, *CHAT]
    with httpx.Client(base_url=server.url, headers=headers(), timeout=60) as http:
        chat = http.post("/tokenize", json={"model": TARGET_NAME, "messages": messages}).json()
        used = client.chat.completions.create(model=TARGET_NAME, messages=messages, max_tokens=1).usage.prompt_tokens
        assert chat["count"] == len(chat["tokens"]) == used and chat["max_model_len"] == MAX_MODEL_LEN
        text = http.post("/tokenize", json={"model": TARGET_NAME, "prompt": "hello world"}).json()
        assert text["tokens"] == saved_tokenizer.encode("hello world")
        assert http.post("/detokenize", json={"model": TARGET_NAME, "tokens": text["tokens"]}).json() == {
            "prompt": saved_tokenizer.decode(text["tokens"])}
        bad = http.post("/detokenize", json={"model": TARGET_NAME, "tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        assert http.post("/tokenize", json={"model": "nope", "prompt": "a"}).status_code == 404
        assert http.post("/tokenize", json={"model": TARGET_NAME}).status_code == 400
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "a"}).status_code == 401


def test_models_card_and_openapi_name_the_served_model(server, client):
    card = client.models.list().data[0].model_extra
    assert card["sampling_defaults"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # no generation_config values
    kernels = card["kernels"]  # what the engine chose at load, on this host
    assert kernels["target"]["quantization"] == "none"  # the target is never quantized unless asked
    assert kernels["draft"]["requested"] == "auto" and kernels["draft"]["quantization"] in ("none", "int8")
    assert kernels["draft"]["lm_head"] in ("none", "int8")  # the draft's LM head, chosen by measurement too
    assert "native_bf16" in kernels["host"] and isinstance(kernels["host"]["flags"], list)
    head = card["specdec"]["heads"]["default"]["kernels"]  # the head's too: w8a8 only where it judges faster
    assert head["requested"] == "auto" and head["quantization"] in ("none", "w8a8")
    assert set(head.get("ms_after_draft_step", {})) <= {"none", "w8a8"}
    for role in ("target", "draft"):  # the wide-GEMM class: fp32 copies, and from how many rows, where made
        record = kernels[role]
        assert record["fp32_copies"] >= 0 and (record["fp32_min_rows"] is None) == (record["fp32_copies"] == 0)
    memory = card["memory"]  # the engine's load: bytes each model holds in host memory, and the peak
    assert memory["held_cpu_bytes"]["target"] > 0 and memory["held_cpu_bytes"]["draft"] > 0
    assert memory["peak_rss_bytes"] >= memory["rss_before_load_bytes"] > 0 and memory["peak_rise_over_held"] > 0
    costs = card["costs"]  # the cost model the engine started from (the tests' --cost-model)
    assert costs == json.loads(json.dumps(CHEAP_DRAFT_COSTS.to_dict()))
    for tokens in costs["target"]:  # the live model in the Prometheus gauges, same sizes
        assert metric(server, "specdec_cost_target_forward_seconds", f'tokens="{tokens}"') > 0
    assert metric(server, "specdec_cost_draft_step_seconds", 'sequences="1"') > 0
    assert all(metric(server, "specdec_cost_scale", f'model="{m}"') > 0 for m in ("draft", "target"))
    schema = httpx.get(f"{server.url}/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "TokenizeBody"):
        assert components[name]["properties"]["model"]["enum"] == [TARGET_NAME]
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses and responses["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}


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
