"""Quantized layers (int8/int4 weights, w8a8) and the host-aware kernel choice.

A quantized draft must keep speculative decoding lossless (greedy identity, the chi-square test);
a quantized target is a different target, and speculation over it must reproduce it exactly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DISTRIBUTION_VOCAB, make_tiny_pair, random_head
from test_engine_distribution import (
    SAMPLES,
    T1,
    accept_every_draft_token,
    chi_square_pvalue,
    exact_two_token_distribution,
    sample_two_tokens,
)
from tiny import CHEAP_DRAFT_COSTS, char_tokenizer, tiny_model
from torch import nn

import engine.costs as costs
import engine.loading.kernels as kernels
import engine.speculate as speculate
from engine.costs import choose_head_kernel
from engine.distributed import draft_decisions
from engine.head import AcceptanceHead, w8a8_head
from engine.llm_engine import LLMEngine
from engine.loading.kernels import DECODE_ROWS, choose_and_quantize, cpu_features, interleaved_ms, probe_layers
from engine.loading.quantize import QuantizedLinear, mode_bits, quantizable, quantize_linears
from engine.params import SamplingParams, SpecConfig


def linear(in_features: int = 64, out_features: int = 48, dtype=torch.float32, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    return layer.to(dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_layer_matches_its_dequantized_reference(bits, dtype):
    """The int kernel (narrow inputs) and the dequantized GEMM (wide inputs) compute the same layer,
    and that layer is close to the original."""
    layer = linear(dtype=dtype)
    quant = QuantizedLinear(layer, bits, wide_rows=8)
    reference = nn.functional.linear
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for rows in (1, 3, 7, 8, 40):  # below and above wide_rows
        x = torch.randn(2, rows, 64, dtype=dtype)
        expected = reference(x.float(), quant.dequantized_weight().float(), layer.bias.float())
        got = quant(x)
        assert got.shape == (2, rows, 48) and got.dtype == dtype
        assert torch.allclose(got.float(), expected, atol=tol * float(expected.abs().max()), rtol=0), rows
    error = (quant.dequantized_weight().float() - layer.weight.float()).abs().max() / layer.weight.float().abs().max()
    assert error < (0.01 if bits == 8 else 0.1)
    assert error > 0  # really quantized


@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_layer_matches_its_reference_within_activation_rounding(dtype, reduce_range):
    """w8a8 rounds each call's activations to int8 (one scale per call): its narrow path is the dequantized
    layer on rounded inputs (within that rounding), its wide path the dequantized GEMM itself."""
    layer = linear(dtype=dtype)
    quant = QuantizedLinear(layer, 8, wide_rows=8, activations=True)
    quant.reduce_range = reduce_range
    assert quant.mode == "w8a8" and not hasattr(quant, "qweight")  # its int8 values: in the packed weight only
    assert torch.equal(quant.dequantized_weight(), QuantizedLinear(layer, 8).dequantized_weight())
    weight, bias = quant.dequantized_weight().float(), layer.bias.float()
    for rows in (1, 3, 7, 8, 40):
        x = torch.randn(rows, 64, dtype=dtype)
        expected = nn.functional.linear(x.float(), weight, bias)
        step = float(x.float().abs().max()) / (63.5 if reduce_range else 127.5)  # the activation quantum
        bound = 0.5 * step * float(weight.abs().sum(dim=1).max()) + 2e-2 * float(expected.abs().max())
        got = quant(x)
        assert got.shape == (rows, 48) and got.dtype == dtype
        assert float((got.float() - expected).abs().max()) <= bound, rows
        if rows < 8:
            assert not torch.equal(got, quant.wide(x))  # the int8 kernel ran, not the dequantized GEMM
    control = nn.functional.linear(torch.randn(1, 64).float(), weight, bias)  # an unrelated input: far off
    assert float((quant(torch.randn(1, 64, dtype=dtype)).float() - control).abs().max()) > bound


def test_quantize_linears_skips_the_lm_head_and_counts():
    model = tiny_model(0)
    n = quantize_linears(model, "int8")
    assert n == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down per layer
    assert type(model.get_output_embeddings()) is nn.Linear
    assert quantize_linears(model, "none") == 0
    with pytest.raises(ValueError, match="quantization"):
        quantize_linears(model, "int3")


def fake_measure(plain_ms: float, int8_ms: float, w8a8_ms: float | None = None, int4_ms: float | None = None):
    """Timings as `measure_kernels` returns them: int8 at `int8_ms`, w8a8 and int4 at `w8a8_ms` and `int4_ms`
    (twice `int8_ms` unless given: the weight-only int8 kernel wins)."""
    def measure(group, modes, plain=None, skip_unavailable=False):
        ms = {"int8": int8_ms, "w8a8": w8a8_ms or 2 * int8_ms, "int4": int4_ms or 2 * int8_ms}
        timings = {"plain": plain or {1: plain_ms, 4: plain_ms}} | {m: {1: ms[m], 4: ms[m]} for m in modes}
        copies = {m: QuantizedLinear(group[0], mode_bits(m), 16, activations=m == "w8a8") for m in modes}
        return timings, dict.fromkeys(modes, 16), copies
    return measure


@pytest.mark.parametrize(("plain_ms", "int8_ms", "w8a8_ms", "int4_ms", "chosen"),
                         [(2.0, 1.0, None, None, "int8"), (2.0, 1.0, 0.5, None, "w8a8"), (1.0, 1.0, None, None, "none"),
                          (1.0, 3.0, 1.05, None, "none"), (2.0, 1.0, 0.5, 0.45, "int4"),
                          (2.0, 1.0, 0.5, 0.46, "w8a8"), (2.0, 3.0, None, 1.0, "int4")])
def test_auto_quantizes_only_where_it_measures_faster(monkeypatch, plain_ms, int8_ms, w8a8_ms, int4_ms, chosen):
    """auto takes the fastest kernel where it beats the unquantized one by `AUTO_MIN_GAIN`; int4 only where it
    also beats the fastest int8 kernel by `INT4_MIN_GAIN` (0.5 / 0.45 is 1.11, 0.5 / 0.46 is 1.09)."""
    monkeypatch.setattr(kernels, "measure_kernels", fake_measure(plain_ms, int8_ms, w8a8_ms, int4_ms))
    model = tiny_model(0)
    choice = choose_and_quantize(model, "auto")
    assert choice.quantization == chosen and choice.requested == "auto"
    assert set(choice.decode_ms) == {"plain", "int8", "w8a8", "int4"}  # all measured, whatever won
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert {m.mode for m in quantized} == (set() if chosen == "none" else {chosen})
    assert all(m.wide_rows == 16 for m in quantized)  # the measured crossover is used
    assert choice.describe()["decode_ms"]["plain"][1] == plain_ms


def test_auto_skips_kernels_this_host_cannot_run(monkeypatch):
    measure = fake_measure(2.0, 1.0, 0.5)

    def without_w8a8(group, modes, plain=None, skip_unavailable=False):
        if "w8a8" in modes and not skip_unavailable:
            raise ValueError("w8a8 needs torch's quantized CPU engine")
        return measure(group, tuple(m for m in modes if m != "w8a8"), plain, skip_unavailable)

    monkeypatch.setattr(kernels, "measure_kernels", without_w8a8)
    assert choose_and_quantize(tiny_model(0), "auto").quantization == "int8"
    with pytest.raises(ValueError, match="quantized CPU engine"):
        choose_and_quantize(tiny_model(0), "w8a8")


def test_the_probe_is_the_layers_a_forward_runs_first(monkeypatch):
    """Enough layers, in model order, to hold `PROBE_MIN_BYTES` of weights (so that their weights come from
    memory when timed one after another), named by the widest."""
    model = tiny_model(0, hidden=64)
    layers = [m for _, _, m in quantizable(model, 8)]
    monkeypatch.setattr(kernels, "PROBE_MIN_BYTES", 1)
    assert probe_layers(model)[1] == layers[:1]
    monkeypatch.setattr(kernels, "PROBE_MIN_BYTES", sum(m.weight.nbytes for m in layers[:9]))
    name, group = probe_layers(model)
    assert group == layers[:9] and len({m.weight.shape for m in group}) > 1  # a decoder layer and more
    assert name == "model.layers.0.mlp.gate_proj"  # first of the widest
    monkeypatch.setattr(kernels, "PROBE_MIN_BYTES", 1 << 40)
    assert probe_layers(model)[1] == layers


def test_kernels_are_timed_in_turn_on_every_probe_layer():
    """Every variant runs every layer of its list at each decode row count, and the times come out per variant."""
    calls: dict[str, list[int]] = {"a": [], "b": []}

    class Recorder(nn.Module):
        def __init__(self, variant: str, in_features: int) -> None:
            super().__init__()
            self.variant, self.in_features = variant, in_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[1] == self.in_features
            calls[self.variant].append(x.shape[0])
            return x

    variants = {v: [Recorder(v, 8), Recorder(v, 16)] for v in calls}
    ms = interleaved_ms(variants, torch.float32, rounds=3)
    assert set(ms) == {"a", "b"} and all(set(by_rows) == set(DECODE_ROWS) for by_rows in ms.values())
    assert all(t > 0 for by_rows in ms.values() for t in by_rows.values())
    assert calls["a"] == calls["b"] == [rows for _ in range(4) for rows in DECODE_ROWS for _ in range(2)]


@pytest.mark.parametrize(("head_plain_ms", "asked", "body", "expected"),
                         [(2.0, True, "int8", "int8"), (2.0, True, "w8a8", "w8a8"), (1.0, True, "int8", "none"),
                          (2.0, False, "int8", "none")])
def test_the_lm_head_is_quantized_only_where_asked_and_faster(monkeypatch, head_plain_ms, asked, body, expected):
    """The LM head follows the body's kernel (int8 or w8a8) where that pays on its own shape."""
    timed = []

    def measure(group, modes, plain_ms=None, skip_unavailable=False):
        plain = head_plain_ms if group[0].out_features == model.config.vocab_size else 2.0
        timings, copies = {"plain": {1: plain, 4: plain}}, {}
        for mode in modes:
            ms = 1.0 if mode == body else 1.5
            timings[mode] = {1: ms, 4: ms}
            copies[mode] = QuantizedLinear(group[0], mode_bits(mode), 16, activations=mode == "w8a8")
            timed.append(copies[mode])
        return timings, dict.fromkeys(modes, 16), copies

    monkeypatch.setattr(kernels, "measure_kernels", measure)
    model = tiny_model(0)
    model.lm_head.weight = model.get_input_embeddings().weight  # tied, as the default draft's are
    embedding = model.get_input_embeddings().weight.clone()
    hidden = torch.randn(3, model.config.hidden_size)
    reference = model.get_output_embeddings()(hidden)
    choice = choose_and_quantize(model, "auto", lm_head=asked)
    head = model.get_output_embeddings()
    assert choice.quantization == body and choice.lm_head == expected
    assert isinstance(head, QuantizedLinear) == (expected != "none")
    assert (head is timed[-1]) == (expected != "none")  # the layer timed is the one installed, not a second build
    assert expected == "none" or head.mode == expected
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # a tied embedding reads the original
    assert torch.allclose(head(hidden), reference, atol=0.02 * float(reference.abs().max()))
    replayed = tiny_model(0)
    replayed.lm_head.weight = replayed.get_input_embeddings().weight
    choose_and_quantize(replayed, choice)  # a follower rank's replay, without measuring
    assert isinstance(replayed.get_output_embeddings(), QuantizedLinear) == (expected != "none")
    assert torch.equal(replayed.get_output_embeddings()(hidden), head(hidden))  # the follower proposes alike


def test_an_unquantized_model_keeps_its_lm_head(monkeypatch):
    monkeypatch.setattr(kernels, "measure_kernels", fake_measure(1.0, 1.0))  # the body does not pay
    model = tiny_model(0)
    assert choose_and_quantize(model, "auto", lm_head=True).lm_head == "none"
    assert type(model.get_output_embeddings()) is nn.Linear


def test_an_int4_body_gets_the_faster_int8_lm_head(monkeypatch):
    """int4 would round the logits themselves: an int4 draft's LM head takes whichever int8 kernel measures
    faster on its own shape."""
    monkeypatch.setattr(kernels, "measure_kernels", fake_measure(2.0, 1.0, 0.5))
    model = tiny_model(0)
    choice = choose_and_quantize(model, "int4", lm_head=True)
    assert (choice.quantization, choice.lm_head) == ("int4", "w8a8")
    assert set(choice.lm_head_decode_ms) == {"plain", "int8", "w8a8"}
    assert model.get_output_embeddings().mode == "w8a8"
    monkeypatch.setattr(kernels, "measure_kernels", fake_measure(2.0, 1.0, 1.5))
    assert choose_and_quantize(tiny_model(0), "int4", lm_head=True).lm_head == "int8"


def test_explicit_modes_do_not_depend_on_timings(monkeypatch):
    monkeypatch.setattr(kernels, "measure_kernels", fake_measure(1.0, 5.0))  # int8 slower, asked anyway
    model = tiny_model(0)
    assert choose_and_quantize(model, "int8").quantization == "int8"
    assert choose_and_quantize(tiny_model(0), "none").quantization == "none"


def test_real_measurement_runs_on_this_host():
    """The chooser measures a real layer here (whatever the CPU), and reports what it saw."""
    choice = choose_and_quantize(tiny_model(0, hidden=64), "auto")
    assert choice.quantization in ("none", "int8", "w8a8", "int4")
    assert set(choice.decode_ms) == {"plain", "int8", "w8a8", "int4"}
    assert all(v > 0 for mode in ("int8", "w8a8", "int4") for v in choice.decode_ms[mode].values())
    features = cpu_features()
    assert set(features) == {"flags", "torch_capability", "native_bf16"}


SPECS = [
    SpecConfig(policy="constant", k=4),
    SpecConfig(policy="specdec++", threshold=0.3, bounds=(1, 10)),
]


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_quantized_draft_keeps_greedy_output_identical(tokenizer, mode, monkeypatch):
    monkeypatch.setattr(kernels, "measure_kernels", fake_measure(2.0, 1.0, 1.0))  # the LM head too
    target, draft = make_tiny_pair()
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)},
                       draft_quantization=mode)
    head_mode = "w8a8" if mode == "w8a8" else "int8"
    assert engine.draft.kernels.quantization == mode and engine.draft.kernels.lm_head == head_mode
    assert isinstance(engine.draft.lm_head, QuantizedLinear)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    proposed = 0
    for prompt in ("hello world", "the quick brown fox"):
        reference = engine.generate(prompt, params, SpecConfig(policy="none"))
        for spec in SPECS:
            out = engine.generate(prompt, params, spec)
            assert out.token_ids == reference.token_ids, (mode, spec.policy)
            proposed += out.stats["proposed_tokens"]
    assert proposed > 0  # the quantized draft really proposed


def test_quantized_target_is_reproduced_exactly_by_speculation(tokenizer):
    """With --target-quantization the target is the quantized one: speculation matches it alone."""
    target, draft = make_tiny_pair()
    engine = LLMEngine(target, draft, tokenizer, target_quantization="int8", draft_quantization="int8")
    assert any(isinstance(m, QuantizedLinear) for m in engine.target.model.modules())
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for prompt in ("hello world", "a"):
        reference = engine.generate(prompt, params, SpecConfig(policy="none"))
        out = engine.generate(prompt, params, SpecConfig(policy="constant", k=3))
        assert out.token_ids == reference.token_ids
        assert out.stats["proposed_tokens"] > 0


def test_a_w8a8_target_is_refused(tokenizer):
    """A w8a8 target's logits for a token depend on the rest of its forward (one activation scale per call):
    speculation, which verifies several tokens in one forward, could not reproduce it alone."""
    target, draft = make_tiny_pair()
    with pytest.raises(ValueError, match="target quantization 'w8a8'"):
        LLMEngine(target, draft, tokenizer, target_quantization="w8a8")


@pytest.fixture(scope="module", params=["int8", "w8a8"])
def int8_distribution_engine(request) -> LLMEngine:
    """A sharp pair whose draft runs an int8 kernel: weight-only, or w8a8 (its activations rounded too)."""
    target = tiny_model(10, vocab_size=DISTRIBUTION_VOCAB, hidden=32, layers=1, scale=10.0)
    draft = tiny_model(11, vocab_size=DISTRIBUTION_VOCAB, hidden=32, layers=1, scale=10.0)
    with pytest.MonkeyPatch.context() as patch:  # the LM head too
        patch.setattr(kernels, "measure_kernels", fake_measure(2.0, 1.0, 1.0))
        engine = LLMEngine(target, draft, char_tokenizer("abcde"), draft_quantization=request.param)
    assert engine.draft.kernels.quantization == engine.draft.kernels.lm_head == request.param
    return engine


def test_int8_draft_matches_the_target_distribution(int8_distribution_engine):
    """Chi-square against the exact target distribution with an int8 draft (its q differs from the
    unquantized draft's; acceptance uses the q it sampled from, so the output is still the target's)."""
    engine = int8_distribution_engine
    counts = sample_two_tokens(engine, T1, SpecConfig(policy="constant", k=3))
    assert chi_square_pvalue(counts, exact_two_token_distribution(engine, T1), SAMPLES) > 1e-3


def test_int8_draft_distribution_control_fails(int8_distribution_engine, monkeypatch):
    """Control: the same test rejects a rule that accepts every int8-draft token."""
    monkeypatch.setattr(speculate, "verify", accept_every_draft_token)
    engine = int8_distribution_engine
    counts = sample_two_tokens(engine, T1, SpecConfig(policy="constant", k=3))
    assert chi_square_pvalue(counts, exact_two_token_distribution(engine, T1), SAMPLES) < 1e-6


# ----- the acceptance head -------------------------------------------------------------------
def trained_scale_head(hidden: int, seed: int) -> AcceptanceHead:
    """A random head at a trained head's scale: each layer keeps its input's, nothing explodes."""
    head = random_head(hidden, seed=seed)
    with torch.no_grad():
        for layer in head.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, layer.in_features**-0.5)
    return head


def test_a_w8a8_head_judges_close_to_the_trained_one():
    head = trained_scale_head(64, seed=5)
    quantized = w8a8_head(head)
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 and all(layer.mode == "w8a8" for layer in layers)  # the blocks
    assert not any(isinstance(m, QuantizedLinear) for m in head.modules())  # the trained head is left as it was
    torch.manual_seed(0)
    states, features = torch.randn(16, 64), torch.randn(16, len(head.config.features))
    with torch.inference_mode():
        for i in range(16):  # one row a call, as a round judges one sequence
            z, zq = head(states[i : i + 1], features[i : i + 1]), quantized(states[i : i + 1], features[i : i + 1])
            assert (zq - z).abs().item() < 0.05 * (1 + z.abs().item())


def fake_fastest(ms_by_head: dict[str, float], heads: dict[str, object]):
    """`fastest` timing each head's judgement at `ms_by_head` (by "none"/"w8a8"), any other call at 0."""
    def fastest(fn, times, warm_up=True, before=None):
        judged = fn.__defaults__[0] if fn.__defaults__ else None
        return next((ms / 1e3 for name, ms in ms_by_head.items() if heads.get(name) is judged), 0.0)
    return fastest


@pytest.mark.parametrize(("none_ms", "w8a8_ms", "max_error", "chosen"),
                         [(1.0, 0.5, 0.1, "w8a8"), (1.0, 0.95, 0.1, "none"), (1.0, 0.5, 1e-9, "none")])
def test_auto_quantizes_the_head_where_it_judges_faster_and_close(
        monkeypatch, tiny_pair, tokenizer, none_ms, w8a8_ms, max_error, chosen):
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, costs=CHEAP_DRAFT_COSTS)
    head = trained_scale_head(target.config.hidden_size, seed=6)
    quantized = w8a8_head(head)
    monkeypatch.setattr(costs, "w8a8_head", lambda h: quantized)
    monkeypatch.setattr(costs, "fastest", fake_fastest({"none": none_ms, "w8a8": w8a8_ms},
                                                       {"none": head, "w8a8": quantized}))
    monkeypatch.setattr(costs, "HEAD_W8A8_MAX_LOGIT_ERROR", max_error)
    chosen_head, choice = choose_head_kernel(head, engine.draft, "auto")
    assert choice["quantization"] == chosen and chosen_head is (quantized if chosen == "w8a8" else head)
    assert choice["ms_after_draft_step"] == {"none": none_ms, "w8a8": w8a8_ms}
    assert 0 < choice["max_logit_error"] < 0.1
    assert choose_head_kernel(head, engine.draft, "none") == (head, {"requested": "none", "quantization": "none"})
    assert choose_head_kernel(head, engine.draft, "w8a8")[0] is quantized  # asked for: whatever it measured


def test_a_w8a8_head_keeps_greedy_output_identical(tokenizer):
    target, draft = make_tiny_pair()
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)},
                       head_quantization="w8a8", costs=CHEAP_DRAFT_COSTS)
    assert engine.head_kernels["default"]["quantization"] == "w8a8"
    assert any(isinstance(m, QuantizedLinear) for m in engine.heads["default"].modules())
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    proposed = 0
    for prompt in ("hello world", "the quick brown fox"):
        reference = engine.generate(prompt, params, SpecConfig(policy="none"))
        for spec in (SPECS[1], SpecConfig(policy="specdec++", threshold="auto", bounds=(1, 10))):
            out = engine.generate(prompt, params, spec)
            assert out.token_ids == reference.token_ids, spec.threshold
            proposed += out.stats["proposed_tokens"]
    assert proposed > 0


@pytest.fixture(scope="module")
def w8a8_head_distribution_engine() -> LLMEngine:
    """The sharp pair of the distribution tests, its head judging in w8a8."""
    target = tiny_model(10, vocab_size=DISTRIBUTION_VOCAB, hidden=16, layers=1, scale=10.0)
    draft = tiny_model(11, vocab_size=DISTRIBUTION_VOCAB, hidden=16, layers=1, scale=10.0)
    engine = LLMEngine(target, draft, char_tokenizer("abcde"), heads={"default": random_head(16, seed=3)},
                       head_quantization="w8a8", costs=CHEAP_DRAFT_COSTS)
    assert engine.head_kernels["default"]["quantization"] == "w8a8"
    return engine


@pytest.mark.parametrize("threshold", [0.4, "auto"])
def test_a_w8a8_head_keeps_the_target_distribution(w8a8_head_distribution_engine, threshold):
    engine = w8a8_head_distribution_engine
    counts = sample_two_tokens(engine, T1, SpecConfig(policy="specdec++", threshold=threshold, bounds=(1, 6)))
    assert chi_square_pvalue(counts, exact_two_token_distribution(engine, T1), SAMPLES) > 1e-3


def test_a_w8a8_head_distribution_control_fails(w8a8_head_distribution_engine, monkeypatch):
    """Control: the same test rejects a rule that accepts every draft token."""
    monkeypatch.setattr(speculate, "verify", accept_every_draft_token)
    engine = w8a8_head_distribution_engine
    counts = sample_two_tokens(engine, T1, SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 6)))
    assert chi_square_pvalue(counts, exact_two_token_distribution(engine, T1), SAMPLES) < 1e-6


def test_a_follower_rank_replays_rank_0s_head_choice(tokenizer):
    """Every rank of a tensor-parallel target runs the draft and the head and must stop its rounds where rank 0
    does: a follower takes rank 0's head kernels instead of timing its own."""
    head = trained_scale_head(make_tiny_pair()[0].config.hidden_size, seed=6)
    leader = LLMEngine(*make_tiny_pair(), tokenizer, heads={"default": head}, head_quantization="w8a8",
                       costs=CHEAP_DRAFT_COSTS)
    decisions = draft_decisions(leader)
    assert decisions["head_quantization"] == {"default": "w8a8"}
    follower = LLMEngine(*make_tiny_pair(), tokenizer, heads={"default": head},
                         head_quantization=decisions["head_quantization"], costs=CHEAP_DRAFT_COSTS)
    assert follower.head_kernels["default"]["quantization"] == "w8a8"
    plain = LLMEngine(*make_tiny_pair(), tokenizer, heads={"default": head}, head_quantization={"default": "none"},
                      costs=CHEAP_DRAFT_COSTS)
    assert plain.heads["default"] is not None and plain.head_kernels["default"]["quantization"] == "none"
