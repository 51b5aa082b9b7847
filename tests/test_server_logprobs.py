"""Logprobs, penalties, logit_bias, min_tokens and stop_token_ids through the HTTP API (openai SDK, live server).

The tiny models are served as in tests/test_server.py. Logprobs must take OpenAI's shapes (chat and
completions, streaming included) and be the same with and without speculation; the sampling
extensions reach the engine and stay lossless; bad values are 400s naming the parameter.
"""

from __future__ import annotations

import math

import openai
import pytest
from conftest import random_head
from live_server import SEED_REPRODUCIBLE, TARGET_NAME, openai_client, save_tiny_pair, serve

from engine.events import TokenLogprob
from server.protocol import LOGPROB_FLOOR, chat_logprobs, completion_logprobs

CHAT = [{"role": "user", "content": "hello there"}]
NO_EOS = {"0": -100}  # the tiny tokenizer's <eos>: every returned token then has text
POLICIES = ({"policy": "none"}, {"policy": "constant", "k": 4}, {"policy": "specdec++"})


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_pair, tokenizer):
    target, draft = tiny_pair
    paths = save_tiny_pair(tmp_path_factory.mktemp("models"), target, draft, tokenizer, random_head(32, seed=3))
    yield from serve(paths, tmp_path_factory.mktemp("log"), check_exit=True)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def chat(client, **kwargs):
    return client.chat.completions.create(model=TARGET_NAME, messages=CHAT, **kwargs)


def complete(client, **kwargs):
    return client.completions.create(model=TARGET_NAME, prompt="the quick brown fox", **kwargs)


# ----- logprobs -------------------------------------------------------------------------------
def test_chat_logprobs_shape_and_lossless(client):
    results = []
    for spec in POLICIES:
        resp = chat(client, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3,
                    logit_bias=NO_EOS, extra_body={"specdec": spec})
        content = resp.choices[0].logprobs.content
        assert len(content) == resp.usage.completion_tokens == 24
        assert "".join(c.token for c in content) == resp.choices[0].message.content
        for c in content:
            assert c.bytes == list(c.token.encode("utf-8")) and c.logprob <= 0.0
            assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token  # greedy: the most likely
            assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        results.append(content)
    for content in results[1:]:
        assert [c.token for c in content] == [c.token for c in results[0]]
        assert [c.logprob for c in content] == pytest.approx([c.logprob for c in results[0]], abs=1e-4)


def test_chat_logprobs_stream_like_the_body(client):
    kwargs = dict(max_tokens=30, temperature=0.8, seed=5, logprobs=True, top_logprobs=2,
                  extra_body={"specdec": SEED_REPRODUCIBLE})
    full = chat(client, **kwargs)
    chunks = list(chat(client, **kwargs, stream=True, stream_options={"include_usage": True}))
    streamed = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert len(streamed) == chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.token for c in streamed] == [c.token for c in full.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in full.choices[0].logprobs.content])
    assert chunks[0].choices[0].logprobs is None  # the role chunk carries no token


def test_completion_logprobs_shape(client):
    for top in (0, 2):
        resp = complete(client, max_tokens=16, temperature=0, logprobs=top, logit_bias=NO_EOS)
        lp = resp.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 16
        assert "".join(lp.tokens) == resp.choices[0].text
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(16)]
        for token, logprob, alternatives in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            assert alternatives[token] == logprob  # the sampled token is always there
            assert len(alternatives) == max(top, 1)  # greedy: the sampled token is among the top


def test_completion_logprobs_stream_offsets_continue(client):
    kwargs = dict(max_tokens=20, temperature=0, logprobs=1, logit_bias=NO_EOS)
    full = complete(client, **kwargs).choices[0].logprobs
    chunks = list(complete(client, **kwargs, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == full.tokens
    assert [o for p in parts for o in p.text_offset] == full.text_offset


def test_several_prompts_each_carry_their_logprobs(client):
    """A completions request of two prompts: each choice has the logprobs (and text offsets, from 0
    in its own text) of that prompt alone, in the body and in the stream's chunks of its index."""
    prompts = ["the quick brown fox", "hello there"]
    kwargs = dict(max_tokens=12, temperature=0, logprobs=2, logit_bias=NO_EOS)
    alone = [client.completions.create(model=TARGET_NAME, prompt=p, **kwargs).choices[0].logprobs for p in prompts]
    both = client.completions.create(model=TARGET_NAME, prompt=prompts, **kwargs)
    assert [c.index for c in both.choices] == [0, 1]
    for choice, single in zip(both.choices, alone, strict=True):
        assert choice.logprobs.tokens == single.tokens and "".join(single.tokens) == choice.text
        assert choice.logprobs.token_logprobs == pytest.approx(single.token_logprobs, abs=1e-4)
        assert choice.logprobs.text_offset == single.text_offset and single.text_offset[0] == 0
    chunks = list(client.completions.create(model=TARGET_NAME, prompt=prompts, stream=True, **kwargs))
    for index, single in enumerate(alone):
        parts = [c.choices[0].logprobs for c in chunks if c.choices[0].index == index and c.choices[0].logprobs]
        assert [t for p in parts for t in p.tokens] == single.tokens
        assert [o for p in parts for o in p.text_offset] == single.text_offset


def test_no_logprobs_unless_asked(client):
    assert chat(client, max_tokens=4).choices[0].logprobs is None
    assert complete(client, max_tokens=4).choices[0].logprobs is None
    assert all(c.choices[0].logprobs is None for c in complete(client, max_tokens=4, stream=True))


def test_excluded_tokens_report_the_floor():
    """JSON has no -inf: a token top-k or top-p filtered out reports LOGPROB_FLOOR, in both shapes."""
    entry = TokenLogprob(1, "a", -0.1, [TokenLogprob(1, "a", -0.1), TokenLogprob(2, "b", -math.inf)])
    assert chat_logprobs([entry])["content"][0]["top_logprobs"][1]["logprob"] == LOGPROB_FLOOR
    assert completion_logprobs([entry], 3)["top_logprobs"] == [{"a": -0.1, "b": LOGPROB_FLOOR}]
    assert completion_logprobs([entry, entry], 3)["text_offset"] == [3, 4]


# ----- penalties, bias, min_tokens, stop_token_ids ------------------------------------------
@pytest.mark.parametrize("fields", [
    {"presence_penalty": 1.5},
    {"frequency_penalty": 1.0},
    {"extra_body": {"repetition_penalty": 1.8}},
    {"logit_bias": {"3": 5, "7": -100}},
    {"extra_body": {"min_tokens": 20, "ignore_eos": False}, "logit_bias": {"0": 8}},
], ids=["presence", "frequency", "repetition", "logit_bias", "min_tokens"])
def test_sampling_extensions_are_lossless(client, fields):
    extra = fields.get("extra_body", {})
    plain = complete(client, max_tokens=30, temperature=0, extra_body={"ignore_eos": True, "specdec": POLICIES[0]})
    texts = []
    for spec in POLICIES:
        kwargs = {k: v for k, v in fields.items() if k != "extra_body"}
        resp = complete(client, max_tokens=30, temperature=0, **kwargs,
                        extra_body={"ignore_eos": True, **extra, "specdec": spec})
        texts.append((resp.choices[0].text, resp.usage.completion_tokens))
    assert texts[0] == texts[1] == texts[2]
    assert texts[0][0] != plain.choices[0].text


def test_stop_token_ids_and_min_tokens(client, tokenizer):
    plain = complete(client, max_tokens=30, temperature=0, logit_bias=NO_EOS).choices[0].text
    char = next(c for i, c in enumerate(plain) if i >= 5 and c not in plain[:i])
    stop_id = tokenizer.convert_tokens_to_ids(char)
    resp = complete(client, max_tokens=30, temperature=0, logit_bias=NO_EOS,
                    extra_body={"stop_token_ids": [stop_id], "specdec": {"policy": "constant", "k": 8}})
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].text == plain[: plain.index(char)]
    assert resp.usage.completion_tokens == plain.index(char) + 1  # the stop token is counted, its text not returned
    later = complete(client, max_tokens=30, temperature=0, logit_bias=NO_EOS,
                     extra_body={"stop_token_ids": [stop_id], "min_tokens": plain.index(char) + 2})
    assert char not in later.choices[0].text[: plain.index(char) + 2]


@pytest.mark.parametrize("kwargs, param", [
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),  # beyond the vocabulary: the engine says so
    ({"extra_body": {"stop_token_ids": [100000]}}, "stop_token_ids"),
    ({"max_tokens": 4, "extra_body": {"min_tokens": 5}}, "min_tokens"),
])
def test_bad_values_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, **kwargs)
    assert info.value.response.json()["error"]["param"] == param


def test_completion_logprobs_above_5_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, logprobs=6)
    assert info.value.response.json()["error"]["param"] == "logprobs"
