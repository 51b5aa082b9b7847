"""Head data logged from the engine's own rounds on a tiny pair: exact labels, layout, resume,
determinism, HumanEval exclusion and the `heads` CLI (tiny models, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturbed, random_head
from safetensors.torch import load_file, save_file
from tiny import tiny_model

import engine.speculate as speculate
import heads.data as head_data
from engine.head import CANDIDATE_FEATURES
from engine.llm_engine import LLMEngine
from heads.data import GenConfig, generate_dataset, load_shards, read_manifest
from specdecpp.datasets import (
    MIXED_CATEGORIES,
    MIXED_PATH,
    Prompt,
    contains_humaneval,
    exclude_humaneval,
    humaneval_markers,
    humaneval_prompts,
    is_code_request,
    iter_sharegpt_records,
    jsonl_prompts,
    load_prompts,
    sharegpt_prompts,
)

F = {name: i for i, name in enumerate(CANDIDATE_FEATURES)}
SAMPLING = ((1.0, 1.0), (0.0, 1.0), (0.7, 0.9))  # plain sampling, greedy, temperature + nucleus
TEXTS = ("hello there", "say a word", "count to ten, please", "write a short poem")


def prompts(n: int, source: str = "test") -> list[Prompt]:
    return [Prompt(str(i), TEXTS[i % len(TEXTS)], source) for i in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_pair, tokenizer):
    target, draft = tiny_pair
    return LLMEngine(target, draft, tokenizer)


@pytest.fixture(scope="module")
def reference_pair():
    """The conftest pair rebuilt from its seeds: plain HF modules the engine never touched."""
    target = tiny_model(0, scale=8.0)
    return target, perturbed(target, 0.05, seed=1)


def reference_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution [N, V] written out independently of engine.sampling."""
    logits = logits.double()
    if temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        out = torch.zeros_like(probs)
        for row, (p, order) in enumerate(zip(*probs.sort(-1, descending=True), strict=True)):
            keep = int((p.cumsum(0) - p < top_p).sum())  # smallest prefix reaching top_p
            out[row, order[:keep]] = p[:keep] / p[:keep].sum()
        probs = out
    return probs


def capture_rounds(monkeypatch) -> list[dict]:
    """Record, for every logged round, its context and candidates (RoundRecord holds neither)."""
    seen: list[dict] = []
    real = speculate.round_record

    def spy(p, candidates, q, target_probs, accepted):
        seen.append({"request_id": p.seq.request_id, "context": list(p.seq.all_ids), "candidates":
                     candidates.tolist(), "accepted": accepted, "params": p.seq.params})
        return real(p, candidates, q, target_probs, accepted)

    monkeypatch.setattr(speculate, "round_record", spy)
    return seen


def rounds_of(data: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Row indices of each logged round, in order (rows of a round are contiguous)."""
    _, counts = torch.unique_consecutive(data["round"], return_counts=True)
    return list(torch.arange(len(data["round"])).split(counts.tolist()))


def test_logged_labels_are_exact_acceptance_probabilities(engine, tokenizer, reference_pair, tmp_path, monkeypatch):
    """Every row's label is min(1, p_s(y_s) / q_s(y_s)) of the target and draft run afresh on the same
    context (prompt + generated tokens + the round's earlier candidates), and its hidden state and
    features are the draft's on that context."""
    ref_target, ref_draft = reference_pair
    seen = capture_rounds(monkeypatch)
    config = GenConfig(k=4, max_new_tokens=12, shard_prompts=3, sampling=SAMPLING, seed=5, hidden_dtype="fp32")
    manifest = generate_dataset(engine, prompts(6), tmp_path, config, {"draft_id": "tiny"})
    assert manifest["complete"] and len(manifest["shards"]) == 2 and manifest["features"] == list(CANDIDATE_FEATURES)
    data = load_shards(tmp_path)
    rounds = rounds_of(data)
    assert len(rounds) == len(seen) > 6 and len(data["accept_prob"]) == manifest["tokens"]
    assert len(torch.unique(data["round"])) == len(rounds)  # round ids are dataset-wide
    assert data["hidden"].dtype == torch.float32 and data["hidden"].shape[1] == 32

    ids = {i: engine.encode(p.messages) for i, p in enumerate(prompts(6))}
    history: dict[int, list[int]] = {}
    greedy_labels = []
    for rows, rnd in zip(rounds, seen, strict=True):
        seq = int(rnd["request_id"].removeprefix("gen-"))
        context, cand = rnd["context"], rnd["candidates"]
        k = len(cand)
        # Layout: one row per candidate proposed, positions 1..k, has_next on all but the last.
        assert data["seq"][rows].eq(seq).all()
        assert data["position"][rows].tolist() == list(range(1, k + 1))
        assert data["has_next"][rows].tolist() == [1] * (k - 1) + [0]
        assert data["round_accepted"][rows].eq(rnd["accepted"]).all()  # what places the round in the text
        # Constant k: k candidates, unless max_new_tokens leaves room for fewer (one goes to the correction).
        generated = len(context) - len(ids[seq])
        assert k == min(config.k, config.max_new_tokens - generated - 1)
        # The context is the prompt, then every earlier round's accepted candidates and one more token (the
        # request's first round, which runs the target alone and is not logged, gives one token).
        expected = history.get(seq, ids[seq])
        assert context[: len(expected)] == expected and len(context) == len(expected) + 1
        history[seq] = context + cand[: rnd["accepted"]]

        temperature, top_p = SAMPLING[seq % len(SAMPLING)]
        assert rnd["params"].temperature == temperature and rnd["params"].top_p == top_p
        full = torch.tensor([context + cand[:-1]])
        positions = torch.arange(len(context) - 1, len(context) - 1 + k)
        with torch.no_grad():
            p_logits = ref_target(full).logits[0, positions]
            draft_out = ref_draft.model(full).last_hidden_state[0, positions]
            q_logits = ref_draft.lm_head(draft_out)
        p = reference_probs(p_logits, temperature, top_p)
        q = reference_probs(q_logits, temperature, top_p)
        y = torch.tensor(cand).unsqueeze(-1)
        p_y, q_y = p.gather(-1, y).squeeze(-1), q.gather(-1, y).squeeze(-1)
        assert (q_y > 0).all()  # every candidate was drawn from q
        label = (p_y / q_y).clamp(max=1.0)
        torch.testing.assert_close(data["accept_prob"][rows].double(), label, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(data["overlap"][rows].double(), torch.minimum(p, q).sum(-1), atol=2e-5, rtol=1e-4)
        # Row s's hidden state produced q_s; the next row's is the draft's state after y_s ("after" heads).
        torch.testing.assert_close(data["hidden"][rows], draft_out, atol=1e-4, rtol=1e-4)
        feats = data["features"][rows]
        log_q1 = q_logits.double().log_softmax(-1).gather(-1, y).squeeze(-1)  # temperature 1, unfiltered
        torch.testing.assert_close(feats[:, F["log_q"]].double(), log_q1, atol=1e-4, rtol=1e-4)
        assert feats[:, F["position"]].tolist() == list(range(1, k + 1))
        assert feats[:, F["temperature"]].eq(temperature).all()
        assert feats[:, F["top_p"]].double().sub(top_p).abs().max() < 1e-6
        if temperature == 0.0:  # greedy: the candidate is the draft's argmax; accepted iff the target's too
            assert feats[:, F["is_argmax"]].eq(1).all()
            greedy_labels.append(data["accept_prob"][rows])
            assert data["accept_prob"][rows].tolist() == (p_logits.argmax(-1) == y.squeeze(-1)).double().tolist()
    greedy = torch.cat(greedy_labels)
    assert greedy.numel() > 0 and ((greedy == 0) | (greedy == 1)).all()
    assert ((data["accept_prob"] >= 0) & (data["accept_prob"] <= 1)).all()
    assert 0.0 < float(data["accept_prob"].mean()) < 1.0  # the noisy draft is partly accepted
    # Per-shard metadata agrees with the rows.
    for shard in manifest["shards"]:
        meta = json.loads((tmp_path / f"{shard['name']}.json").read_text())
        rows = load_file(str(tmp_path / f"{shard['name']}.safetensors"))
        assert meta["tokens"] == len(rows["accept_prob"]) == shard["tokens"]
        for record in meta["records"]:
            done = history[record["index"]]
            assert record["prompt_tokens"] == len(ids[record["index"]])
            last = len(done) - record["prompt_tokens"] + 1  # through the last logged round's extra token
            # A round with one token left proposes nothing (no labels): the target decodes it alone.
            assert 0 < record["response_tokens"] <= last or record["response_tokens"] == config.max_new_tokens


def test_gen_data_resumes_and_is_deterministic(engine, tmp_path, monkeypatch):
    config = GenConfig(k=3, max_new_tokens=8, shard_prompts=2, seed=1)
    calls: list[int] = []
    real = head_data._make_shard

    def interrupted(engine, shard_prompts, index, config):
        calls.append(index)
        if index == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second shard
        return real(engine, shard_prompts, index, config)

    monkeypatch.setattr(head_data, "_make_shard", interrupted)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(engine, prompts(6), resumed, config)
    assert [s["name"] for s in read_manifest(resumed)["shards"]] == ["shard-00000"]
    first = (resumed / "shard-00000.safetensors").read_bytes()
    manifest = generate_dataset(engine, prompts(6), resumed, config)
    assert calls == [0, 1, 1, 2]  # shard 0 was not redone
    assert manifest["complete"] and [s["name"] for s in manifest["shards"]] == [f"shard-0000{i}" for i in range(3)]
    assert (resumed / "shard-00000.safetensors").read_bytes() == first
    generate_dataset(engine, prompts(6), resumed, config)  # a finished run does nothing more
    assert len(calls) == 4
    with pytest.raises(ValueError, match="other arguments"):
        generate_dataset(engine, prompts(6), resumed, GenConfig(k=3, max_new_tokens=9, shard_prompts=2, seed=1))

    # Resumed data equal an uninterrupted run's; another seed gives other data.
    data = load_shards(resumed)
    assert data["hidden"].dtype == torch.bfloat16 and set(data["seq"].tolist()) == set(range(6))
    fresh = generate_dataset(engine, prompts(6), tmp_path / "fresh", config)
    assert fresh["tokens"] == manifest["tokens"]
    again = load_shards(tmp_path / "fresh")
    assert data.keys() == again.keys()
    for name in data:
        assert torch.equal(data[name], again[name]), name
    # A shard logged before a column existed (an older gen-data) still loads with the others, without it.
    shard = resumed / "shard-00001.safetensors"
    save_file({k: v for k, v in load_file(str(shard)).items() if k != "round_accepted"}, str(shard))
    mixed = load_shards(resumed)
    assert "round_accepted" not in mixed and torch.equal(mixed["accept_prob"], data["accept_prob"])
    generate_dataset(engine, prompts(6), tmp_path / "other", GenConfig(k=3, max_new_tokens=8, shard_prompts=2, seed=2))
    other = load_shards(tmp_path / "other")["accept_prob"]
    assert len(other) != len(data["accept_prob"]) or not torch.equal(other, data["accept_prob"])


def test_gen_data_skips_long_prompts_and_needs_a_draft(engine, tiny_pair, tokenizer, tmp_path):
    long = Prompt("long", "a very long prompt " * 10, "test")
    manifest = generate_dataset(engine, [long, *prompts(1)], tmp_path, GenConfig(k=2, max_new_tokens=4,
                                                                                  max_prompt_tokens=40))
    meta = json.loads((tmp_path / "shard-00000.json").read_text())
    assert meta["skipped_ids"] == ["long"] and meta["prompts"] == 1 and manifest["shards"][0]["skipped"] == 1
    assert set(load_shards(tmp_path)["seq"].tolist()) == {1}
    with pytest.raises(ValueError, match="draft"):
        generate_dataset(LLMEngine(tiny_pair[0], None, tokenizer), prompts(1), tmp_path / "x", GenConfig())


def test_training_refuses_eval_only_data_but_evaluation_reads_it(engine, tmp_path):
    from heads.evaluate import evaluate, expected_calibration_error, soft_auc
    from heads.train import load_training_data

    config = GenConfig(k=3, max_new_tokens=8, shard_prompts=4)
    problems = [Prompt(f"HumanEval/{i}", text, "humaneval") for i, text in enumerate(TEXTS)]
    manifest = generate_dataset(engine, problems, tmp_path / "he", config, {"draft_id": "tiny"})
    assert manifest["eval_only"] and manifest["sources"] == ["humaneval"]
    with pytest.raises(ValueError, match="evaluation-only"):
        load_training_data([tmp_path / "he"], "before")
    head = random_head(32, seed=2)
    result = evaluate(head, tmp_path / "he")
    assert result["tokens"] == manifest["tokens"] and 0.0 <= result["auc_head"] <= 1.0
    # The head, the draft's confidence and the constant are scored on the same rows.
    rows = load_shards(tmp_path / "he")
    label, q = rows["accept_prob"], rows["features"][:, F["log_q"]].exp()
    a = head.accept_prob(rows["hidden"], rows["features"])
    assert result["auc_confidence"] == pytest.approx(soft_auc(1 - q.double(), 1 - label.double()), abs=1e-5)
    assert result["auc_head"] == pytest.approx(soft_auc(1 - a.double(), 1 - label.double()), abs=1e-5)
    assert result["ece_head"] == pytest.approx(expected_calibration_error(a, label), abs=1e-5)
    half = len(label) // 2  # the shipped calibration's error by half of the rows, beside the online calibrator's
    assert result["online_calibration"]["ece_shipped_second_half"] == pytest.approx(
        expected_calibration_error(a[half:], label[half:]), abs=1e-5)
    assert 0.0 <= result["online_calibration"]["ece_online_first_half"] <= 1.0
    assert result["predictors"]["constant"]["auc_reject"] == pytest.approx(0.5)
    assert result["mean_accept_prob"] == pytest.approx(float(label.mean()), abs=1e-5)
    low, high = result["auc_gap_ci95"]
    assert low <= high and low - 0.05 <= result["auc_head"] - result["auc_confidence"] <= high + 0.05
    # Training data must come from one draft.
    generate_dataset(engine, prompts(2), tmp_path / "a", config, {"draft_id": "tiny"})
    generate_dataset(engine, prompts(2), tmp_path / "b", config, {"draft_id": "other"})
    with pytest.raises(ValueError, match="draft_id"):
        load_training_data([tmp_path / "a", tmp_path / "b"], "before")
    data, summary = load_training_data([tmp_path / "a", tmp_path / "a"], "after")
    assert summary["draft_id"] == "tiny" and summary["prompts"] == 4
    assert len(torch.unique(data["seq"])) == 4  # sequence keys stay apart across directories


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
    # JSONL prompts go through the same filter.
    lines = [json.dumps(leaked.text), json.dumps({"prompt": "tell me a joke"}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}]})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    assert [p.text for p in jsonl_prompts(tmp_path / "p.jsonl")] == ["tell me a joke", "hi"]


def test_cli_train_eval_predict(engine, tmp_path, capsys):
    from engine.costs import CostModel
    from specdecpp.cli import main

    config = GenConfig(k=4, max_new_tokens=12, shard_prompts=8)
    description = {"draft_id": "tiny-draft", "target_id": "tiny-target", "source": "test"}
    generate_dataset(engine, prompts(12), tmp_path / "train", config, description)
    generate_dataset(engine, prompts(4), tmp_path / "eval", config, description)
    head_dir = tmp_path / "head"
    args = ["heads", "train", "--data", str(tmp_path / "train"), "--out", str(head_dir), "--epochs", "3",
            "--timing", "after", "--val-fraction", "0.25"]
    assert main(args) == 0
    saved = json.loads((head_dir / "config.json").read_text())
    assert saved["version"] == 2 and saved["timing"] == "after" and saved["draft_id"] == "tiny-draft"
    assert saved["hidden_size"] == 32 and set(saved["calibration"]) == {"scale", "bias"}
    assert len(saved["training"]["data_hash"]) == 64 and saved["training"]["tokens"] > 0
    assert saved["training"]["target_id"] == "tiny-target"

    out_json = tmp_path / "eval.json"
    args = ["heads", "eval", "--head", str(head_dir), "--data", str(tmp_path / "eval"), "--json", str(out_json)]
    assert main([*args, "--report"]) == 0
    result = json.loads(out_json.read_text())[0]
    assert set(result["predictors"]) == {"head", "confidence", "constant"}
    assert result["head_timing"] == "after" and 0.0 <= result["auc_head"] <= 1.0
    eval_rows = load_shards(tmp_path / "eval")
    assert result["tokens"] == int(eval_rows["has_next"].sum())  # an "after" head judges all but each round's last
    assert "| confidence |" in (head_dir / "REPORT.md").read_text()
    assert "AUC(reject)" in capsys.readouterr().out

    costs = tmp_path / "costs.json"
    CostModel(draft_step=0.01, draw=0.0005, features=0.0005, head=0.0005, target={1: 0.1, 8: 0.15}).save(costs)
    out = tmp_path / "predict.json"
    args = ["heads", "predict", "--data", str(tmp_path / "eval"), "--head", str(head_dir), "--costs", str(costs),
            "--bounds", "1", "4", "--output", str(out)]
    assert main(args) == 0
    predicted = json.loads(out.read_text())
    assert predicted["logged_k"] == 4
    assert predicted["replay"] == "text" and predicted["text_positions"] > 0  # gen-data keeps each round's accepted
    assert set(predicted["best"]) == {"none", "constant", "confidence", "specdec++", "specdec++ auto", "oracle"}
    assert predicted["best"]["specdec++ auto"]["knob"] == "auto"  # the engine's self-tuning, replayed
    assert predicted["best"]["none"]["speedup"] == pytest.approx(1.0)
    assert "specdec++" in capsys.readouterr().out
    assert main([*args, "--headroom"]) == 0  # heads between this one and a perfect one
    headroom = json.loads(out.read_text())["headroom"]
    assert [h["head"] for h in headroom] == ["default", "headroom0.025", "headroom0.05", "headroom0.1", "headroom0.2"]
    assert all(h["auto_over_constant_ci95"][0] <= h["auto_over_constant"] <= h["auto_over_constant_ci95"][1]
               for h in headroom) and "headroom w=0.2" in capsys.readouterr().out


def test_cli_gen_data_loads_the_pair_and_describes_it(tiny_pair, tokenizer, tmp_path, capsys):
    """`heads gen-data` end to end: the pair loaded from its directories, JSONL prompts, the
    sampling cycle and the manifest's description of the run."""
    from live_server import save_tiny_pair

    from specdecpp.cli import main

    paths = save_tiny_pair(tmp_path / "models", *tiny_pair, tokenizer, random_head(32))
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(json.dumps(text) for text in TEXTS[:3]) + "\n")
    out = tmp_path / "data"
    pair = ["--target", str(paths["target"]), "--draft", str(paths["draft"])]
    args = ["heads", "gen-data", *pair, "--dtype", "fp32", "--device", "cpu", "--source", str(source),
            "--num-prompts", "3", "--max-new-tokens", "6", "--k", "3", "--shard-prompts", "2", "--batch-size", "2",
            "--sampling", "0:1", "0.7", "--out", str(out)]
    assert main(args) == 0
    manifest = read_manifest(out)
    assert manifest["complete"] and len(manifest["shards"]) == 2 and manifest["num_prompts"] == 3
    assert {k: manifest[k] for k in ("source", "split", "draft_id", "target_id", "dtype", "batch_size")} == {
        "source": str(source), "split": None, "draft_id": "tiny-draft", "target_id": "tiny-target",
        "dtype": "fp32", "batch_size": 2}
    assert manifest["config"]["sampling"] == [[0.0, 1.0], [0.7, 1.0]] and manifest["config"]["k"] == 3
    assert f"{out}: 2 shards, {manifest['tokens']} candidates, complete=True" in capsys.readouterr().out
    assert main(["heads", "gen-data", *pair[:2], "--out", str(out)]) == 2  # a target without its draft
    with pytest.raises(SystemExit, match="TEMPERATURE:TOP_P"):
        main([*args, "--sampling", "warm"])


def test_mixed_set_has_every_category_and_language_and_unique_prompts():
    """The out-of-distribution set: every category and eight languages besides English, each prompt
    non-empty, unique and no code request; `num` of them spread over every category."""
    records = [json.loads(line) for line in MIXED_PATH.read_text(encoding="utf-8").splitlines()]
    assert len(records) >= 32
    assert [r["category"] for r in records] == sorted((r["category"] for r in records), key=MIXED_CATEGORIES.index)
    assert {r["language"] for r in records} >= {"en", "fr", "de", "es", "zh", "ja", "ru", "pt", "hi"}
    texts = [r["prompt"].strip() for r in records]
    assert all(texts) and len(set(texts)) == len(texts) and len({r["id"] for r in records}) == len(records)
    assert not [t for t in texts if is_code_request(t)]
    every = load_prompts("mixed", len(records) + 10)  # asking for more gives them all
    assert [p.text for p in every] == [r["prompt"] for r in records] and {p.source for p in every} == {"mixed"}
    category = {r["id"]: r["category"] for r in records}
    eight = load_prompts("mixed", 8)
    assert len(eight) == 8 and {category[p.id] for p in eight} == set(MIXED_CATEGORIES)
    assert load_prompts("mixed", 8) == eight  # the same selection every time


def test_mixed_set_is_evaluation_only(engine, tmp_path):
    from heads.train import load_training_data

    mixed = load_prompts("mixed", 2)
    manifest = generate_dataset(engine, mixed, tmp_path, GenConfig(k=2, max_new_tokens=4, max_prompt_tokens=400))
    assert manifest["eval_only"] and manifest["sources"] == ["mixed"]
    with pytest.raises(ValueError, match="evaluation-only"):
        load_training_data([tmp_path], "before")
