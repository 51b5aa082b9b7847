"""response_format (json_object, json_schema) through the HTTP API: the openai SDK against a live server.

The tiny models here use a tokenizer that can spell JSON (tests/test_structured_output.py); the output
must parse and follow its schema, equal the target alone at temperature 0 under speculation, stream in
pieces that join to the same document, and bad formats must be 400s naming the parameter.
"""

from __future__ import annotations

import json

import openai
import pytest
from conftest import perturbed, random_head
from live_server import TARGET_NAME, openai_client, save_tiny_pair, serve
from test_structured_output import JSON_CHARS, SCHEMA, follows_schema
from tiny import char_tokenizer, tiny_model

CHAT = [{"role": "user", "content": "abc"}]
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
POLICIES = ({"policy": "none"}, {"policy": "constant", "k": 4}, {"policy": "specdec++"})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tokenizer = char_tokenizer(JSON_CHARS)
    target = tiny_model(20, vocab_size=len(tokenizer), scale=4.0)
    draft = perturbed(target, 0.05, seed=21)
    paths = save_tiny_pair(tmp_path_factory.mktemp("models"), target, draft, tokenizer, random_head(32, seed=3))
    yield from serve(paths, tmp_path_factory.mktemp("log"))


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def test_json_schema_output_follows_the_schema_and_is_lossless(client):
    texts = []
    for spec in POLICIES:
        resp = client.chat.completions.create(model=TARGET_NAME, messages=CHAT, temperature=0, max_tokens=120,
                                              response_format=JSON_SCHEMA, extra_body={"specdec": spec})
        choice = resp.choices[0]
        assert choice.finish_reason == "stop"
        assert follows_schema(json.loads(choice.message.content)), choice.message.content
        texts.append(choice.message.content)
    assert texts[1:] == texts[:-1]


def test_json_object_on_chat_and_completions(client):
    resp = client.chat.completions.create(model=TARGET_NAME, messages=CHAT, temperature=0, max_tokens=200,
                                          response_format={"type": "json_object"})
    assert resp.choices[0].message.content.startswith("{")
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].message.content), dict)
    completion = client.completions.create(model=TARGET_NAME, prompt="abc", temperature=0, max_tokens=120,
                                           extra_body={"response_format": JSON_SCHEMA})
    assert follows_schema(json.loads(completion.choices[0].text))


def test_streamed_pieces_join_to_the_document(client):
    kwargs = dict(model=TARGET_NAME, messages=CHAT, temperature=1.0, seed=5, max_tokens=120,
                  response_format=JSON_SCHEMA, extra_body={"specdec": {"policy": "constant", "k": 4}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(stream=True, **kwargs)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == whole


def test_n_choices_each_follow_the_schema(client):
    resp = client.chat.completions.create(model=TARGET_NAME, messages=CHAT, temperature=1.0, seed=1, n=3,
                                          max_tokens=120, response_format=JSON_SCHEMA)
    assert len(resp.choices) == 3
    for choice in resp.choices:
        if choice.finish_reason == "stop":
            assert follows_schema(json.loads(choice.message.content))


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
])
def test_bad_response_formats_are_400s(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_tokens=8, extra_body=body)
    assert err.value.body["param"] == param
    ok = client.chat.completions.create(model=TARGET_NAME, messages=CHAT, max_tokens=4)  # still serving
    assert ok.choices[0].finish_reason in ("stop", "length")
