"""Head data generation on tiny random models: labels, mixing, resume, HumanEval exclusion, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import char_tokenizer, tiny_model

import heads.data as head_data
from heads.data import GenConfig, final_hidden, generate_dataset, label_batch, load_shards, sample_responses
from heads.prompts import (
    Prompt,
    contains_humaneval,
    exclude_humaneval,
    humaneval_markers,
    humaneval_prompts,
    iter_sharegpt_records,
    sharegpt_prompts,
)

EOS = [0]


@pytest.fixture(scope="module")
def pair():
    return tiny_model(1, scale=4.0), tiny_model(2, scale=4.0), char_tokenizer()


def prompts(n: int) -> list[Prompt]:
    return [Prompt(str(i), "say a word" if i % 2 else "hello there", "test") for i in range(n)]


def test_labels_match_teacher_forced_distributions(pair):
    target, draft, _ = pair
    prompt_ids = [[3, 4, 5], [7, 8, 9, 10, 11]]
    responses, logits = sample_responses(target, prompt_ids, 10, EOS, pad_id=0, seed=0)
    for r, lg in zip(responses, logits, strict=True):
        assert 1 <= len(r) <= 10 and lg.shape[0] == len(r)
        assert 0 not in r[:-1]  # cut after the first EOS
    out = label_batch(draft, prompt_ids, responses, logits, 0, 0.3, torch.Generator().manual_seed(0))
    n = sum(len(r) for r in responses)
    assert out["hidden"].shape == (n, 32) and out["p_acc"].shape == (n,)
    # p and q from independent teacher-forced forwards of prompt + t.
    with torch.no_grad():
        offset = 0
        for p, r in zip(prompt_ids, responses, strict=True):
            ids = torch.tensor([p + r])
            pt = target(ids).logits[0, len(p) - 1 : len(p) - 1 + len(r)].softmax(-1)
            qt = draft(ids).logits[0, len(p) - 1 : len(p) - 1 + len(r)].softmax(-1)
            d = out["draft_token"][offset : offset + len(r)].long().unsqueeze(-1)
            torch.testing.assert_close(
                out["p_tok"][offset : offset + len(r)], pt.gather(-1, d).squeeze(-1), atol=1e-4, rtol=1e-3
            )
            torch.testing.assert_close(
                out["q_tok"][offset : offset + len(r)], qt.gather(-1, d).squeeze(-1), atol=1e-4, rtol=1e-3
            )
            assert out["target_token"][offset : offset + len(r)].tolist() == r
            offset += len(r)
    expected = (out["p_tok"] / out["q_tok"]).clamp(max=1.0)
    torch.testing.assert_close(out["p_acc"], expected)
    assert ((out["overlap"] > 0) & (out["overlap"] <= 1 + 1e-5)).all()


def test_mixing_masks_exactly_the_mixed_positions(pair):
    target, draft, _ = pair
    prompt_ids = [[3, 4, 5, 6], [9, 10]]
    responses = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]]
    logits = [torch.randn(len(r), 31) for r in responses]
    out = label_batch(draft, prompt_ids, responses, logits, 0, 0.5, torch.Generator().manual_seed(4), torch.float32)
    mask = out["mask"].bool()
    assert 0 < int(mask.sum()) < len(mask)
    # The head's inputs are the draft's hidden states of prompt + z, z = t where mask is 0, else d.
    z = torch.where(mask, out["draft_token"], out["target_token"]).tolist()
    offset = 0
    for p, r in zip(prompt_ids, responses, strict=True):
        hidden = final_hidden(draft, [p + z[offset : offset + len(r)]], 0)[0, len(p) :]
        torch.testing.assert_close(out["hidden"][offset : offset + len(r)], hidden)
        offset += len(r)
    # Ratio 0: nothing mixed; ratio 1: everything mixed and the inputs are prompt + t.
    none = label_batch(draft, prompt_ids, responses, logits, 0, 0.0, torch.Generator().manual_seed(4), torch.float32)
    assert none["mask"].all()
    full = label_batch(draft, prompt_ids, responses, logits, 0, 1.0, torch.Generator().manual_seed(4), torch.float32)
    assert not full["mask"].any()
    teacher = final_hidden(draft, [prompt_ids[0] + responses[0]], 0)[0, len(prompt_ids[0]) :]
    torch.testing.assert_close(full["hidden"][: len(responses[0])], teacher)


def test_gen_data_resume_skips_finished_shards(pair, tmp_path, monkeypatch):
    target, draft, tok = pair
    config = GenConfig(max_new_tokens=6, max_prompt_tokens=64, batch_size=2, shard_prompts=2)
    real = head_data._make_shard
    calls: list[int] = []

    def failing(*args, **kwargs):
        index = args[4]
        calls.append(index)
        if index == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # interrupted during the second shard
        return real(*args, **kwargs)

    monkeypatch.setattr(head_data, "_make_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(target, draft, tok, prompts(6), tmp_path, config, EOS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000"]
    first = load_file(str(tmp_path / "shard-00000.safetensors"))
    manifest = generate_dataset(target, draft, tok, prompts(6), tmp_path, config, EOS)
    assert calls == [0, 1, 1, 2]  # shard 0 not redone
    assert manifest["complete"] and len(manifest["shards"]) == 3
    assert torch.equal(load_file(str(tmp_path / "shard-00000.safetensors"))["p_acc"], first["p_acc"])
    data = load_shards(tmp_path)
    assert data["hidden"].dtype == torch.bfloat16 and len(data["p_acc"]) == manifest["tokens"]
    assert set(data["seq"].tolist()) == set(range(6))
    # A finished run does nothing more; other arguments into the same directory are refused.
    generate_dataset(target, draft, tok, prompts(6), tmp_path, config, EOS)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="other arguments"):
        generate_dataset(target, draft, tok, prompts(6), tmp_path, GenConfig(max_new_tokens=7), EOS)


def test_humaneval_is_held_out(tmp_path):
    problem = humaneval_prompts(1)[0]
    markers = humaneval_markers()
    assert len(markers) > 164  # a signature and a docstring fragment per problem
    leaked = Prompt("x", "Please fix this:\n" + problem.text.replace("    ", "  "), "sharegpt")
    clean = Prompt("y", "Write a python function that reverses a list.", "sharegpt")
    assert contains_humaneval(leaked.text, markers)
    assert exclude_humaneval([leaked, clean, problem]) == [clean]
    # A ShareGPT file cut off mid-record: parsed up to the cut, the leaked prompt dropped.
    records = [
        {"id": f"c{i}", "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]}
        for i, text in enumerate(["write python code to sort a list", leaked.text, "tell me a joke", "what is 2+2"])
    ]
    text = json.dumps(records, indent=2)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.rindex('"what is')])  # truncated inside the last record
    assert [r["id"] for r in iter_sharegpt_records(path)] == ["c0", "c1", "c2"]
    chosen = {p.text for split in ("train", "heldout") for p in sharegpt_prompts(10, split, path=path)}
    assert chosen == {"write python code to sort a list", "tell me a joke"}


def test_train_refuses_humaneval_data(pair, tmp_path):
    from heads.train import load_training_data

    target, draft, tok = pair
    config = GenConfig(max_new_tokens=4, max_prompt_tokens=10_000, batch_size=2, shard_prompts=2)
    generate_dataset(target, draft, tok, humaneval_prompts(2), tmp_path, config, EOS)
    with pytest.raises(ValueError, match="evaluation-only"):
        load_training_data([tmp_path])


def test_cli_train_and_eval(pair, tmp_path, capsys):
    from specdecpp.cli import main

    target, draft, tok = pair
    config = GenConfig(max_new_tokens=12, max_prompt_tokens=64, batch_size=4, shard_prompts=8)
    description = {"draft_id": "tiny-draft", "target_id": "tiny-target", "source": "test"}
    generate_dataset(target, draft, tok, prompts(16), tmp_path / "train", config, EOS, description)
    generate_dataset(target, draft, tok, prompts(4), tmp_path / "eval", config, EOS, description)
    head_dir = tmp_path / "head"
    assert main(["heads", "train", "--data", str(tmp_path / "train"), "--out", str(head_dir), "--epochs", "3"]) == 0
    saved = json.loads((head_dir / "config.json").read_text())
    assert saved["draft_id"] == "tiny-draft" and saved["hidden_size"] == 32 and saved["depth"] == 3
    assert len(saved["training"]["data_hash"]) == 64 and saved["training"]["tokens"] > 0
    out_json = tmp_path / "eval.json"
    args = ["heads", "eval", "--head", str(head_dir), "--data", str(tmp_path / "eval"), "--json", str(out_json)]
    assert main([*args, "--report"]) == 0
    result = json.loads(out_json.read_text())[0]
    assert set(result["predictors"]) == {"head", "head_unweighted", "confidence", "constant"}
    assert 0.0 <= result["predictors"]["head"]["auc_reject"] <= 1.0
    assert "| confidence |" in (head_dir / "REPORT.md").read_text()
    assert "AUC(reject)" in capsys.readouterr().out
