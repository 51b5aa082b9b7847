"""Continuous batching: per-sequence losslessness whatever the batch mates, admission limits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import random_head
from test_engine_distribution import PAIR, PROMPT, SAMPLES, T1, chi_square_pvalue, exact_two_token_distribution

from engine.llm_engine import LLMEngine
from engine.params import SamplingParams, SpecConfig
from engine.runner import ModelRunner
from engine.scheduler import LOAD_WINDOW, Scheduler, SchedulerConfig

MIXED = [
    ("hello world", SpecConfig(policy="constant", k=3)),
    ("the quick brown fox jumps", SpecConfig(policy="specdec++", threshold=0.3, bounds=(1, 8))),
    ("a", SpecConfig(policy="none")),
    ("lorem ipsum dolor sit amet, consectetur", SpecConfig(policy="heuristic", k=2, bounds=(1, 10))),
    ("zz", SpecConfig(policy="confidence", p_min=0.5, bounds=(1, 6))),
    ("hello world", SpecConfig(policy="specdec++", threshold=0.8, bounds=(2, 12))),
]


def run_all(engine: LLMEngine, requests: list[tuple[str, str, SamplingParams, SpecConfig]]) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {rid: [] for rid, *_ in requests}
    for rid, prompt, params, spec in requests:
        engine.add_request(rid, prompt, params, spec)
    while engine.has_unfinished():
        for event in engine.step():
            assert event.error is None, event.error
            outputs[event.request_id].extend(event.token_ids)
    return outputs


@pytest.mark.parametrize("fresh_row", [False, True], ids=["all-cached", "one-fresh-row"])
def test_forward_batch_matches_single_forwards(tiny_pair, fresh_row):
    """Ragged batches (different cached and new lengths, an empty cache) equal one forward per row,
    twice in a row, so the caches written back by the first batch are right too."""
    runner = ModelRunner(tiny_pair[0])
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    batch_caches, ref_caches = [runner.new_cache() for _ in prompts], [runner.new_cache() for _ in prompts]
    for i, (p, b, r) in enumerate(zip(prompts, batch_caches, ref_caches, strict=True)):
        if fresh_row and i == 1:
            continue  # this row's cache stays empty: it joins the batch with its whole prompt
        runner.forward(torch.tensor([p[:-2]]), b)
        runner.forward(torch.tensor([p[:-2]]), r)
    for feeds, num in (([[5, 6], [9, 3, 4, 5], [17, 18]], [2, 4, 1]), ([[3], [4, 5, 6], [7, 8]], [1, 3, 2])):
        if fresh_row and batch_caches[1].get_seq_length() == 0:
            feeds[1] = prompts[1] + [3, 4, 5]  # the same number of logits asked for
        _, logits = runner.forward_batch(feeds, batch_caches, num)
        for i, (feed, ref) in enumerate(zip(feeds, ref_caches, strict=True)):
            _, ref_logits = runner.forward(torch.tensor([feed]), ref, num_logits=num[i])
            torch.testing.assert_close(logits[i], ref_logits[0], atol=1e-5, rtol=1e-4)
            assert batch_caches[i].get_seq_length() == ref.get_seq_length()
            for layer, ref_layer in zip(batch_caches[i].layers, ref.layers, strict=True):
                torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "round-robin"])
def test_greedy_identical_to_running_alone(tiny_pair, tokenizer, batching):
    target, draft = tiny_pair
    heads = {"default": random_head(target.config.hidden_size)}
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = LLMEngine(target, draft, tokenizer, heads=heads, scheduler_config=SchedulerConfig(max_num_seqs=1))
    reference = {f"r{i}": alone.generate(p, params, SpecConfig(policy="none")).token_ids
                 for i, (p, _) in enumerate(MIXED)}
    engine = LLMEngine(target, draft, tokenizer, heads=heads,
                       scheduler_config=SchedulerConfig(max_num_seqs=4, batching=batching))
    # different max_tokens so sequences leave at different times and others join
    requests = [(f"r{i}", p, params.model_copy(update={"max_tokens": 12 + 4 * i}), spec)
                for i, (p, spec) in enumerate(MIXED)]
    outputs = run_all(engine, requests)
    for rid, _, p, _ in requests:
        assert outputs[rid] == reference[rid][: p.max_tokens], rid
    assert not engine.has_unfinished() and engine.scheduler.kv_used == 0


def test_sampled_distribution_with_mixed_batches(distribution_engine):
    """The tested request shares every round with batch mates of other policies and prompts."""
    engine = distribution_engine
    spec = SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 6))
    mates = [SpecConfig(policy="constant", k=2), SpecConfig(policy="none"), SpecConfig(policy="confidence")]
    counts: Counter = Counter()
    batch = 5
    for start in range(0, SAMPLES, batch):
        requests = [(f"t{s}", PROMPT, T1.model_copy(update={"seed": s}), spec) for s in range(start, start + batch)]
        requests += [(f"m{start}-{j}", [4, 1][: j + 1], T1.model_copy(update={"max_tokens": 2 + j}), mate)
                     for j, mate in enumerate(mates)]
        outputs = run_all(engine, requests)
        for rid, *_ in requests[:batch]:
            counts[tuple(outputs[rid][PAIR])] += 1
    pvalue = chi_square_pvalue(counts, exact_two_token_distribution(engine, T1), SAMPLES)
    assert pvalue > 1e-3, f"chi-square p={pvalue:.2e}"


def test_admission_limits_and_fifo(tiny_pair, tokenizer):
    target, draft = tiny_pair
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine = LLMEngine(target, draft, tokenizer,
                       scheduler_config=SchedulerConfig(max_num_seqs=2, kv_cache_tokens=40))
    for i in range(4):
        engine.add_request(f"r{i}", "abcdefghij", params, SpecConfig(policy="constant", k=2))  # needs 20 each
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["r0", "r1"]
    assert engine.num_waiting == 2
    assert engine.scheduler.load(engine.scheduler.running[:1]) == 2  # the load to come: within max_num_seqs
    finished_order = []
    while engine.has_unfinished():
        assert len(engine.scheduler.running) <= 2 and engine.scheduler.kv_used <= 40
        finished_order += [e.request_id for e in engine.step() if e.finished]
    assert finished_order.index("r0") < finished_order.index("r2")
    with pytest.raises(ValueError, match="KV-cache budget"):
        engine.add_request("big", "abcdefghij", params.model_copy(update={"max_tokens": 35}),
                           SpecConfig(policy="none"))


def test_the_load_to_come_is_the_recent_peak():
    """A client's next request comes a moment after its answer: the dip between them is not the load to come."""
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4))
    assert scheduler.peak_load() == 1  # before any round
    scheduler.running = [object()] * 3  # type: ignore[list-item]
    scheduler.waiting.extend([object()] * 2)  # type: ignore[list-item]
    assert scheduler.load([]) == 4  # running and waiting, within max_num_seqs
    scheduler.waiting.clear()
    scheduler.running = scheduler.running[:1]
    assert scheduler.peak_load() == 4  # what the worker reports its budget at: the last rounds' price
    assert scheduler.load([]) == 4  # the recent peak holds
    for _ in range(LOAD_WINDOW - 1):
        scheduler.load([])
    assert scheduler.load([]) == 1  # ... until it has been gone for LOAD_WINDOW steps
    assert Scheduler(SchedulerConfig(batching=False)).load([object()]) == 1  # type: ignore[list-item]


def test_long_prefill_is_chunked(tiny_pair, tokenizer):
    """A long prompt is prefilled one chunk per step while a running stream keeps producing."""
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, scheduler_config=SchedulerConfig(max_num_batched_tokens=16))
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    engine.add_request("running", "hi", params, SpecConfig(policy="constant", k=2))
    engine.step()
    engine.step()
    engine.add_request("long", "x" * 100, params, SpecConfig(policy="constant", k=2))
    steps_until_long_decodes = 0
    while not engine.requests["long"].output_ids:
        events = {e.request_id: e for e in engine.step()}
        assert events["running"].token_ids  # the running stream is never stalled
        steps_until_long_decodes += 1
    assert steps_until_long_decodes >= 100 // 16



PROMPTS_3 = ["hello world", "the quick brown fox jumps", "lorem ipsum dolor sit amet"]


def _greedy_references(tiny_pair, tokenizer, max_tokens: int) -> tuple:
    """(head, greedy params, {"r0".."r2": the target alone's tokens}) for PROMPTS_3, each run alone."""
    target, draft = tiny_pair
    heads = {"default": random_head(target.config.hidden_size)}
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    alone = LLMEngine(target, draft, tokenizer, heads=heads, scheduler_config=SchedulerConfig(max_num_seqs=1))
    none = SpecConfig(policy="none")
    return heads, params, {f"r{i}": alone.generate(p, params, none).token_ids for i, p in enumerate(PROMPTS_3)}


def test_speculation_disabled_by_batch_size_stays_lossless(tiny_pair, tokenizer, monkeypatch):
    """Rounds of >= 3 sequences run the target alone and requests joining them skip the draft's
    prefill; once the batch shrinks the draft catches up (in chunks of max_num_batched_tokens when
    it lags further) and speculation resumes for a request with more tokens left than the draft lags."""
    import engine.speculate as speculate

    target, draft = tiny_pair
    heads, params, reference = _greedy_references(tiny_pair, tokenizer, max_tokens=120)
    spec = SpecConfig(policy="constant", k=3)
    caught_up: dict[str, list[int]] = {}  # request id -> its draft cache's length at each catch-up
    real_catch_up = speculate.catch_up_draft

    def spy(seqs, d, chunk):
        for seq in seqs:
            caught_up.setdefault(seq.request_id, []).append(seq.draft_kv.cached)
        real_catch_up(seqs, d, chunk)

    monkeypatch.setattr(speculate, "catch_up_draft", spy)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, spec_disable_batch_size=3)
    engine = LLMEngine(target, draft, tokenizer, heads=heads, scheduler_config=config)
    stats = {}
    requests = [(f"r{i}", p, params.model_copy(update={"max_tokens": 24 if i < 2 else 120}), spec)
                for i, p in enumerate(PROMPTS_3)]
    for rid, prompt, p, s in requests:
        engine.add_request(rid, prompt, p, s)
    outputs: dict[str, list[int]] = {rid: [] for rid, *_ in requests}
    while engine.has_unfinished():
        # r2 joined a batch of 3: its draft is not prefilled, it gets a cache only by catching up.
        assert engine.requests["r2"].draft_kv.cache is None or "r2" in caught_up
        for event in engine.step():
            assert event.error is None, event.error
            outputs[event.request_id].extend(event.token_ids)
            if event.finished:
                stats[event.request_id] = event.stats
    for rid, _, p, _ in requests:
        assert outputs[rid] == reference[rid][: p.max_tokens], rid
    long = stats["r2"].candidate_lengths
    assert long[0] == 0 and 0 in long and max(long) == 3  # target alone while batched, then speculating
    # The long request lagged by more than a chunk: it catches up in chunks, from an empty draft cache.
    assert caught_up["r2"][0] == 0 and caught_up["r2"] == sorted(caught_up["r2"]) and len(caught_up["r2"]) > 1
    assert not engine.has_unfinished()


def test_spec_disable_batch_size_validated():
    with pytest.raises(ValueError, match="spec_disable_batch_size"):
        SchedulerConfig(spec_disable_batch_size=1)
    with pytest.raises(ValueError, match="spec_batch_candidates"):
        SchedulerConfig(spec_batch_candidates=0)


def test_batch_candidate_budget_splits_over_the_batch_and_stays_lossless(tiny_pair, tokenizer):
    """--speculative-batch-candidates 5: three sequences propose at most 1 each, two at most 2,
    one alone up to its policy's 4; with six the target runs alone. Greedy outputs stay the
    target's whatever the share."""
    target, draft = tiny_pair
    heads, params, reference = _greedy_references(tiny_pair, tokenizer, max_tokens=40)
    spec = SpecConfig(policy="constant", k=4)
    config = SchedulerConfig(max_num_seqs=3, spec_batch_candidates=5)
    engine = LLMEngine(target, draft, tokenizer, heads=heads, scheduler_config=config)
    assert [engine.scheduler.candidate_cap([None] * b) for b in (1, 2, 3, 6)] == [5, 2, 1, 0]
    requests = [(f"r{i}", p, params.model_copy(update={"max_tokens": 12 * (i + 1)}), spec)
                for i, p in enumerate(PROMPTS_3)]
    outputs: dict[str, list[int]] = {rid: [] for rid, *_ in requests}
    stats = {}
    for rid, prompt, p, s in requests:
        engine.add_request(rid, prompt, p, s)
    while engine.has_unfinished():
        running = len([s for s in engine.scheduler.running if s.prefilled])
        for event in engine.step():
            assert event.error is None, event.error
            outputs[event.request_id].extend(event.token_ids)
            if event.finished:
                stats[event.request_id] = event.stats
        assert running <= 3
    for rid, _, p, _ in requests:
        assert outputs[rid] == reference[rid][: p.max_tokens], rid
    lengths = {rid: s.candidate_lengths for rid, s in stats.items()}
    # One prefill per step; each request's first round is the target alone. r0 decodes alone, then beside r1,
    # then beside both until it finishes.
    assert lengths["r0"][:2] == [0, 2] and max(lengths["r0"][2:]) == 1
    assert max(lengths["r1"]) == 2 and lengths["r1"].count(2) > 1  # beside r0 first, again once r0 left
    assert lengths["r2"][:2] == [0, 1] and max(lengths["r2"]) == 4  # alone at the end: its policy's k
