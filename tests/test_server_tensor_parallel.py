"""The server with `--tensor-parallel-size 2` on tiny models, through the openai SDK: the engine process
is rank 0 and starts its follower rank; greedy answers equal the single-process engine's, and killing
the follower brings the whole engine down and back (the supervisor restarts every rank), with a clean
error for the request in flight.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import psutil
import pytest
from conftest import random_head
from live_server import TARGET_NAME, LiveServer, openai_client, save_tiny_pair, serve

from engine.config import EngineConfig
from engine.factory import build_engine
from engine.params import SamplingParams, SpecConfig

pytestmark = [
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_pair, tokenizer):
    return save_tiny_pair(tmp_path_factory.mktemp("tp-models"), *tiny_pair, tokenizer, random_head(32, seed=3))


@pytest.fixture(scope="module")
def server(tmp_path_factory, paths):
    yield from serve(paths, tmp_path_factory.mktemp("tp-log"), ("--tensor-parallel-size", "2"))


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def follower_pids(server: LiveServer) -> list[int]:
    """The ranks the engine process started (`python -m engine.distributed`)."""
    engine = psutil.Process(server.engine_pid())
    return [p.pid for p in engine.children() if "engine.distributed" in p.cmdline()]


@pytest.mark.parametrize("spec", [{"policy": "none"}, {"policy": "constant", "k": 3},
                                  {"policy": "specdec++", "threshold": 0.3}], ids=lambda s: s["policy"])
def test_greedy_answers_equal_one_process(client, paths, spec):
    single = build_engine(EngineConfig(target=str(paths["target"]), draft=str(paths["draft"]),
                                       head=str(paths["head"]), dtype="fp32"))
    expected = single.generate("hello world", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                               SpecConfig(**spec)).text
    answer = client.completions.create(model=TARGET_NAME, prompt="hello world", max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True, "specdec": spec})
    assert answer.choices[0].text == expected
    assert answer.usage.completion_tokens == 16


def test_streamed_chat_with_choices_and_sampling(client):
    stream = client.chat.completions.create(
        model=TARGET_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=12, n=2, temperature=1.0,
        stream=True, extra_body={"ignore_eos": True, "specdec": {"policy": "constant", "k": 3}})
    text = {0: "", 1: ""}
    finished = {}
    for chunk in stream:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert finished == {0: "length", 1: "length"} and all(text.values())


def test_killing_a_rank_restarts_the_engine(server, client):
    followers = follower_pids(server)
    assert len(followers) == 1
    old_engine = server.engine_pid()
    body = {"model": TARGET_NAME, "prompt": "hello", "max_tokens": 480, "ignore_eos": True, "stream": True,
            "specdec": {"policy": "none"}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      timeout=httpx.Timeout(60, read=60)) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it runs
        os.kill(followers[0], signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "engine_unavailable"
    deadline = time.monotonic() + 180
    while httpx.get(f"{server.url}/health").status_code != 200:
        assert time.monotonic() < deadline, f"the engine did not come back:\n{server.log()}"
        time.sleep(0.2)
    assert server.engine_pid() != old_engine and follower_pids(server) != followers
    again = client.completions.create(model=TARGET_NAME, prompt="again", max_tokens=4, temperature=0)
    assert again.usage.completion_tokens == 4
