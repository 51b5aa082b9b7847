"""oneDNN packed linears: identical to nn.Linear on narrow inputs; the fp32 copy for wide inputs
agrees to bf16 rounding; `auto` respects the memory it may take and measures the crossover; the LM
head never gets a copy; few-row inputs are padded to the cheapest measured count at or above theirs,
and a padded input's rows are exactly those of the larger call. Every case runs on any x86 host with
oneDNN: where bf16 is native, the emulated case is forced (`native_bf16` patched) and also run for
real under an AVX2 ISA cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import tiny_model
from torch import nn

from engine.loading import cpu_linear, kernels, quantize
from engine.loading.cpu_linear import (
    FP32_MIN_ROWS,
    Fp32Linear,
    PackedLinear,
    can_pack,
    fp32_copy_plan,
    native_bf16,
    pack_linears,
)
from engine.loading.kernels import padding_plan, row_padding_plan
from engine.loading.quantize import QuantizedLinear, quantize_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@pytest.fixture(params=["native", "emulated"])
def bf16_host(request, monkeypatch) -> str:
    """Each case on this host as it is and as a host without native bf16 (AVX2 only) would run it."""
    if request.param == "emulated":
        monkeypatch.setattr(cpu_linear, "native_bf16", lambda: False)
        monkeypatch.setattr(quantize, "native_bf16", lambda: False)
    elif not native_bf16():
        pytest.skip("this host has no native bf16: the emulated case covers it")
    return request.param


def _bf16_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(256, 384, bias=True).to(torch.bfloat16)


def test_narrow_inputs_match_nn_linear_exactly(bf16_host):
    """Below FP32_MIN_ROWS a packed layer gives nn.Linear's result bit for bit, from its bf16 weight
    even when it has an fp32 copy (zeroed here, so any use of it would show)."""
    linear = _bf16_linear()
    plain, with_copy = PackedLinear(linear), PackedLinear(linear, fp32_copy=True)
    assert plain.packed == (bf16_host == "native")
    with_copy.fp32.packed_weight.zero_()
    for rows in (1, 4, FP32_MIN_ROWS - 1):
        x = torch.randn(1, rows, 256, dtype=torch.bfloat16)
        with torch.inference_mode():
            expected = linear(x)
            assert torch.equal(plain(x), expected), rows
            assert torch.equal(with_copy(x), expected), rows
    wide = torch.randn(1, FP32_MIN_ROWS, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert not torch.equal(with_copy(wide), linear(wide))  # from FP32_MIN_ROWS on, the (zeroed) copy is used


def test_wide_inputs_use_the_fp32_copy_and_agree_to_bf16_rounding(bf16_host):
    linear = _bf16_linear()
    packed = PackedLinear(linear, fp32_copy=True)
    assert packed.fp32_copy and packed.fp32.packed_weight.dtype == torch.float32
    x = torch.randn(2, FP32_MIN_ROWS, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = packed(x)
        exact = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert out.dtype == torch.bfloat16 and out.shape == (2, FP32_MIN_ROWS, 384)
    # Products of bf16 values are exact in fp32; only the final rounding to bf16 (and summation
    # order) remains: within one bf16 ulp of the exact result.
    ulp = exact.abs().clamp_min(1e-3) * 2.0**-7
    assert ((out.double() - exact).abs() <= ulp).all()


def test_fp32_layers_never_get_a_copy():
    torch.manual_seed(0)
    linear = nn.Linear(64, 64)
    assert not PackedLinear(linear, fp32_copy=True).fp32_copy


def test_pack_linears_copies_every_bf16_layer_but_the_lm_head():
    model = tiny_model(seed=0).to(torch.bfloat16)
    assert can_pack(model)
    head = model.get_output_embeddings()
    n = pack_linears(model, fp32_copies="on")
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert n == len(packed) > 1
    lm_head = model.get_output_embeddings()
    if not native_bf16():  # only the layers with a copy are wrapped; the head stays aten's
        assert type(lm_head) is nn.Linear and all(m.fp32_copy for m in packed)
        return
    assert isinstance(lm_head, PackedLinear) and not lm_head.fp32_copy
    assert all(m.fp32_copy for m in packed if m is not lm_head)
    # The packed head is the original head's weight, also for the wide inputs a copy would take.
    x = torch.randn(2 * FP32_MIN_ROWS, head.in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(lm_head(x), head(x))


def test_auto_copies_only_when_they_fit(monkeypatch):
    model = tiny_model(seed=0).to(torch.bfloat16)
    extra = sum(m.weight.numel() * 4 for m in model.modules()
                if type(m) is nn.Linear and m is not model.get_output_embeddings())
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: extra * 4)
    monkeypatch.setattr(cpu_linear, "wide_gemm_ms", lambda linear, rows: {r: (2.0, 1.0) for r in rows})  # fp32 faster
    assert fp32_copy_plan(model, "auto")[0]
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: extra)  # would take all of it
    assert not fp32_copy_plan(model, "auto")[0]
    assert fp32_copy_plan(model, "on")[0] and not fp32_copy_plan(model, "off")[0]
    with pytest.raises(ValueError, match="expected one of"):
        fp32_copy_plan(model, "sometimes")


def test_auto_copies_only_where_fp32_is_measured_faster(monkeypatch):
    model = tiny_model(seed=0).to(torch.bfloat16)
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 1 << 40)
    for bf16_ms, fp32_ms, copies in ((2.0, 1.0, True), (1.0, 2.0, False), (1.0, 0.95, False)):  # within 10%: no
        monkeypatch.setattr(cpu_linear, "wide_gemm_ms",
                            lambda linear, rows, b=bf16_ms, f=fp32_ms: {r: (b, f) for r in rows})
        assert bool(fp32_copy_plan(model, "auto")[0]) is copies
    monkeypatch.undo()
    timings = cpu_linear.wide_gemm_ms(nn.Linear(256, 384).to(torch.bfloat16), (1, 64))  # a real probe
    assert all(b > 0 and f > 0 for b, f in timings.values())


def test_auto_measures_where_the_copies_start_to_pay(monkeypatch):
    """An AVX2-only host (bf16 emulated) makes fp32 faster from a few rows on, inside verification: the
    copies serve from the first row count where fp32 wins, measured on the widest layer."""
    model = tiny_model(seed=0).to(torch.bfloat16)
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 1 << 40)
    # The shape of the AVX2 EPYC table: bf16 grows with rows, fp32 costs more for 1-2 rows only.
    monkeypatch.setattr(cpu_linear, "wide_gemm_ms", lambda linear, rows: {r: (1.8 * r, 3.0 + 0.5 * r) for r in rows})
    layers, min_rows = fp32_copy_plan(model, "auto")
    assert layers and min_rows == 4
    pack_linears(model, fp32_copies="auto")
    assert {m.fp32_min_rows for m in model.modules() if isinstance(m, PackedLinear) and m.fp32_copy} == {4}


def test_a_quantized_layer_runs_wide_inputs_in_fp32_where_bf16_is_emulated(bf16_host):
    linear = _bf16_linear()
    quant = QuantizedLinear(linear, 8, wide_rows=8)
    assert isinstance(quant.wide, Fp32Linear) == (bf16_host == "emulated")
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = quant(x)
        exact = torch.nn.functional.linear(x.double(), quant.dequantized_weight().double(), linear.bias.double())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= exact.abs().clamp_min(1e-3) * 2.0**-7).all()


EMULATED_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_a_host_capped_at_avx2_is_detected_and_gets_its_copies():
    """For real, not patched: under oneDNN's and aten's AVX2 caps (what an AVX2-only CPU offers) bf16 is
    not native, the layers get fp32 copies and the packed model still matches the unpacked one."""
    script = """
import json, torch
from tiny import tiny_model
from engine.loading.cpu_linear import PackedLinear, native_bf16, pack_linears
from engine.loading.kernels import cpu_features
model, reference = tiny_model(seed=0).to(torch.bfloat16), tiny_model(seed=0).to(torch.bfloat16)
pack_linears(model, fp32_copies="on")
ids = torch.randint(0, model.config.vocab_size, (1, 40))
with torch.inference_mode():
    a, b = model(ids).logits.float(), reference(ids).logits.float()
packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
print(json.dumps({"native": native_bf16(), "features": cpu_features(), "copies": sum(m.fp32_copy for m in packed),
                  "wrapped": len(packed), "error": float((a - b).abs().max() / a.abs().max())}))
"""
    env = {**os.environ, **EMULATED_AVX2, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["native"] is False and result["features"]["native_bf16"] is False
    assert result["features"]["torch_capability"] == "AVX2"
    assert result["copies"] == result["wrapped"] > 0  # only layers with a copy are wrapped
    assert result["error"] < 0.05


def test_a_bf16_model_with_copies_matches_it_without(bf16_host):
    """A prompt long enough for the copies (a prefill): the logits of the whole model stay within
    bf16 rounding noise of the model packed without copies, and the argmaxes agree."""
    torch.manual_seed(0)
    reference = tiny_model(seed=0).to(torch.bfloat16).eval()
    with_copies = tiny_model(seed=0).to(torch.bfloat16).eval()
    pack_linears(reference, fp32_copies="off")
    pack_linears(with_copies, fp32_copies="on")
    ids = torch.randint(0, reference.config.vocab_size, (1, 3 * FP32_MIN_ROWS))
    with torch.inference_mode():
        a = reference(ids).logits.float()
        b = with_copies(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_the_runner_records_its_wide_gemm_choice():
    """What the `/v1/models` card and the bench show per model: how many layers got a copy, from which rows."""
    from engine.runner import ModelRunner

    with_copies = ModelRunner(tiny_model(seed=0).to(torch.bfloat16), cpu_fp32_gemm="on").kernels
    assert with_copies.fp32_copies == 7 * 2 and with_copies.fp32_min_rows == FP32_MIN_ROWS  # 2 tiny layers
    without = ModelRunner(tiny_model(seed=0).to(torch.bfloat16), cpu_fp32_gemm="off").kernels
    assert without.fp32_copies == 0 and without.fp32_min_rows is None


# Measured on the AMD EPYC's target MLPs (ms of 28 layers, weights from memory): one and two rows are slower than four.
EPYC_CURVE = {1: 90.0, 2: 110.0, 3: 79.0, 4: 69.0, 5: 76.0, 6: 72.0, 7: 100.0, 8: 96.0}


def test_padding_plan_pads_to_the_cheapest_count_at_or_above():
    assert padding_plan(EPYC_CURVE) == {1: 4, 2: 4, 3: 4, 5: 6}  # 4 is cheapest; 7 -> 8 gains under 5%
    assert padding_plan({r: 10.0 + r for r in range(1, 9)}) == {}  # cost rising with rows: nothing to gain
    assert padding_plan({1: 10.0, 2: 9.7}) == {}  # 3% is within the noise: left as it is
    assert padding_plan({1: 10.0, 2: 9.0, 3: 9.0}) == {1: 2}  # a tie goes to the fewer rows


def test_a_padded_input_gives_the_rows_of_the_larger_call(bf16_host):
    layer = PackedLinear(_bf16_linear())
    x = torch.randn(1, 8, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = {rows: layer(x[:, :rows]) for rows in (1, 2, 3, 5)}  # unpadded
        layer.pad_rows = {1: 5, 2: 5}
        computed: list[int] = []  # row counts the kernel saw
        compute = layer.compute
        layer.compute = lambda rows_in: computed.append(rows_in.shape[0]) or compute(rows_in)
        for rows in (1, 2):
            padded = nn.functional.pad(x[0, :rows], (0, 0, 0, 5 - rows))
            out = layer(x[:, :rows])
            assert out.shape == (1, rows, 384)
            assert torch.equal(out[0], compute(padded)[:rows]), rows
        assert computed == [5, 5]
        assert torch.equal(layer(x[:, :3]), expected[3])  # not in the plan: as it was
        assert torch.equal(layer(x[0, :1]), layer(x[:, :1])[0])  # a 2-D input too
        assert computed[-2:] == [5, 5]


def _fake_curve(monkeypatch) -> list[int]:
    """Every group of layers measured with EPYC_CURVE, whatever its size; returns the sizes of the groups timed."""
    timed: list[int] = []
    monkeypatch.setattr(kernels, "ROW_PADDING_MIN_BYTES", 0)
    monkeypatch.setattr(kernels, "few_rows_ms", lambda layers: timed.append(len(layers)) or dict(EPYC_CURVE))
    return timed


def test_row_padding_is_measured_by_groups_of_one_shape_and_replayed(monkeypatch):
    model = tiny_model(seed=0)
    pack_linears(model)
    assert row_padding_plan(model, "auto") == {}  # a tiny model stays in cache: nothing measured, nothing padded
    timed = _fake_curve(monkeypatch)
    plan = row_padding_plan(model, "auto")
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    shapes = {m.shape for m in layers}
    assert set(plan) == shapes and len(timed) == len(shapes) and sum(timed) == len(layers)
    assert all(m.pad_rows == {1: 4, 2: 4, 3: 4, 5: 6} for m in layers)
    assert row_padding_plan(model, "off") == {} and all(not m.pad_rows for m in layers)
    one_shape = next(iter(shapes))
    assert row_padding_plan(model, {one_shape: {1: 2}}) == {one_shape: {1: 2}}  # replayed, not measured
    assert len(timed) == len(shapes)
    assert all(m.pad_rows == ({1: 2} if m.shape == one_shape else {}) for m in layers)
    with pytest.raises(ValueError, match="row padding"):
        row_padding_plan(model, "sometimes")


def test_a_quantized_layers_dequantized_copy_is_not_padded(monkeypatch):
    """Its PackedLinear only serves wide inputs; the quantized model's other packed layers are padded."""
    timed = _fake_curve(monkeypatch)
    model = tiny_model(seed=0)
    quantize_linears(model, "int8", wide_rows=64)
    pack_linears(model)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(isinstance(q.wide, PackedLinear) for q in quantized)
    plan = row_padding_plan(model, "auto")
    assert not any(q.wide.pad_rows for q in quantized)
    unquantized = {m.shape for m in model.modules() if isinstance(m, PackedLinear)} - {q.wide.shape for q in quantized}
    assert unquantized and set(plan) == unquantized and len(timed) == len(unquantized)  # the LM head


def test_the_runner_records_and_replays_its_row_padding(monkeypatch):
    from engine.runner import ModelRunner

    _fake_curve(monkeypatch)
    measured = ModelRunner(tiny_model(seed=0)).kernels
    assert measured.row_padding and all(p == {1: 4, 2: 4, 3: 4, 5: 6} for p in measured.row_padding.values())
    assert ModelRunner(tiny_model(seed=0), cpu_row_padding="off").kernels.row_padding == {}
    replayed = ModelRunner(tiny_model(seed=0), cpu_row_padding="off", quantization=measured)  # a follower rank
    assert replayed.kernels.row_padding == measured.row_padding


def test_padded_engine_keeps_greedy_output_identical(tokenizer, monkeypatch):
    """Target and draft padded as on the EPYC: speculation still reproduces the (padded) target alone."""
    from conftest import make_tiny_pair, random_head

    from engine.llm_engine import LLMEngine
    from engine.params import SamplingParams, SpecConfig

    _fake_curve(monkeypatch)
    target, draft = make_tiny_pair()
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)})
    assert engine.target.kernels.row_padding and engine.draft.kernels.row_padding
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for prompt in ("hello world", "the quick brown fox"):
        reference = engine.generate(prompt, params, SpecConfig(policy="none"))
        for spec in (SpecConfig(policy="constant", k=4), SpecConfig(policy="specdec++", threshold=0.3)):
            out = engine.generate(prompt, params, spec)
            assert out.token_ids == reference.token_ids, spec.policy
            assert out.stats["proposed_tokens"] > 0
