"""`n` > 1 through the openai SDK against a live tiny server: choices, seeds, usage, streaming indices."""

from __future__ import annotations

import openai
import pytest
from conftest import random_head
from live_server import SEED_REPRODUCIBLE, TARGET_NAME, openai_client, save_tiny_pair, serve

CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_pair, tokenizer):
    paths = save_tiny_pair(tmp_path_factory.mktemp("choices-models"), *tiny_pair, tokenizer, random_head(32, seed=3))
    yield from serve(paths, tmp_path_factory.mktemp("choices-log"), ("--kv-cache-tokens", "2048"))


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def test_greedy_choices_are_the_n_1_answer(client):
    kwargs = dict(model=TARGET_NAME, messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    single = client.chat.completions.create(**kwargs)
    three = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in three.choices] == [single.choices[0].message.content] * 3
    assert three.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == 3 * 12 == three.model_extra["specdec"]["generated_tokens"]
    assert three.model_extra["specdec"]["prompt_tokens"] == single.usage.prompt_tokens


def test_seeded_choices_are_reproducible_and_start_with_the_n_1_answer(client):
    kwargs = dict(model=TARGET_NAME, prompt="the quick", max_tokens=16, temperature=1.0, seed=42,
                  extra_body={"ignore_eos": True, "specdec": SEED_REPRODUCIBLE})
    single = client.completions.create(**kwargs).choices[0].text
    three = [c.text for c in client.completions.create(n=3, **kwargs).choices]
    assert three[0] == single
    assert [c.text for c in client.completions.create(n=3, **kwargs).choices] == three
    assert len(set(three)) > 1


def test_several_prompts_times_n_are_numbered_as_openai(client):
    kwargs = dict(model=TARGET_NAME, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    prompts = ["abc", "hello world"]
    singles = [client.completions.create(prompt=p, **kwargs) for p in prompts]
    both = client.completions.create(prompt=prompts, n=2, **kwargs)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]  # prompt i, choice j: index i * n + j
    assert [c.text for c in both.choices] == [s.choices[0].text for s in singles for _ in range(2)]
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert both.usage.completion_tokens == 4 * 6


def test_streamed_choices_carry_their_index(client):
    kwargs = dict(model=TARGET_NAME, messages=CHAT, max_tokens=10, temperature=0.9, seed=9,
                  extra_body={"ignore_eos": True, "specdec": SEED_REPRODUCIBLE})
    full = client.chat.completions.create(n=3, **kwargs)
    chunks = list(client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, roles, finishes = ["", "", ""], set(), []
    for chunk in chunks[:-1]:
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        if choice.delta.role:
            roles.add(choice.index)
        if choice.finish_reason:
            finishes.append(choice.index)
    assert roles == {0, 1, 2} and sorted(finishes) == [0, 1, 2]
    assert texts == [c.message.content for c in full.choices]
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


@pytest.mark.parametrize("n", [0, 17])
def test_n_out_of_range_is_400(client, n):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_tokens=4, n=n)
    assert info.value.response.json()["error"]["param"] == "n"


def test_n_over_the_kv_budget_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TARGET_NAME, prompt="abc", max_tokens=400, n=6)
    error = info.value.response.json()["error"]
    assert (error["param"], error["code"]) == ("n", "context_length_exceeded")
