"""A live server started with --max-over-acceptance: lossy over-acceptance is served when asked for, reported as
lossy in the response and in Prometheus, and refused above the flag's limit; multi-draft requests report their
winning paths."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import random_head
from live_server import TARGET_NAME, openai_client, save_tiny_pair, serve

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_pair, tokenizer):
    root = tmp_path_factory.mktemp("theory-models")
    paths = save_tiny_pair(root, *tiny_pair, tokenizer, random_head(32, seed=5))
    yield from serve(paths, root, ("--max-over-acceptance", "0.1"))


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def lossy_requests(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("specdec_lossy_requests_total"))


def test_over_acceptance_is_served_and_reported_as_lossy(server, client):
    before = lossy_requests(server)
    resp = client.chat.completions.create(
        model=TARGET_NAME, messages=CHAT, max_tokens=16, seed=1,
        extra_body={"ignore_eos": True, "specdec": {"policy": "constant", "k": 3, "over_acceptance": 0.1}})
    specdec = resp.model_extra["specdec"]
    assert specdec["lossless"] is False and specdec["over_acceptance"] == 0.1
    assert specdec["config"]["over_acceptance"] == 0.1 and resp.usage.completion_tokens == 16
    assert specdec["verified_positions"] >= specdec["accepted_tokens"]
    assert lossy_requests(server) == before + 1
    stream = client.chat.completions.create(
        model=TARGET_NAME, messages=CHAT, max_tokens=8, stream=True,
        extra_body={"specdec": {"policy": "constant", "over_acceptance": 0.05}})
    finish = [chunk for chunk in stream if chunk.choices and chunk.choices[0].finish_reason][-1]
    assert finish.model_extra["specdec"]["lossless"] is False  # the finish chunk says it too


def test_lossless_requests_stay_lossless(server, client):
    before = lossy_requests(server)
    resp = client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_tokens=8,
                                          extra_body={"specdec": {"policy": "constant"}})
    assert resp.model_extra["specdec"]["lossless"] is True and lossy_requests(server) == before


def test_over_acceptance_above_the_flag_is_refused(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_tokens=4,
                                       extra_body={"specdec": {"over_acceptance": 0.2}})
    error = info.value.response.json()["error"]
    assert error["param"] == "specdec.over_acceptance" and "0.1" in error["message"]
    assert client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_tokens=4).choices


def test_multi_draft_requests_report_their_paths(client):
    resp = client.chat.completions.create(
        model=TARGET_NAME, messages=CHAT, max_tokens=24, seed=2,
        extra_body={"ignore_eos": True, "specdec": {"policy": "constant", "k": 2, "num_drafts": 3}})
    specdec = resp.model_extra["specdec"]
    assert specdec["config"]["num_drafts"] == 3 and specdec["lossless"] is True
    assert specdec["accepted_paths"] and set(specdec["accepted_paths"]) <= {0, 1, 2}
    assert specdec["accepted_per_target_call"] == specdec["accepted_tokens"] / specdec["target_calls"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_tokens=4,
                                       extra_body={"specdec": {"num_drafts": 9}})
    assert info.value.response.json()["error"]["param"] == "specdec.num_drafts"
