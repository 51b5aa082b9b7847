"""oneDNN packed linears: identical to nn.Linear on narrow inputs; the fp32 copy for wide inputs
agrees to bf16 rounding; `auto` respects the memory it may take; the LM head never gets a copy."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model
from torch import nn

from engine.loading import cpu_linear
from engine.loading.cpu_linear import FP32_MIN_ROWS, PackedLinear, can_pack, fp32_copy_plan, pack_linears

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="needs oneDNN with bf16 support",
)


def _bf16_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(256, 384, bias=True).to(torch.bfloat16)


def test_narrow_inputs_match_nn_linear_exactly():
    """Below FP32_MIN_ROWS a packed layer gives nn.Linear's result bit for bit, from its bf16 weight
    even when it has an fp32 copy (zeroed here, so any use of it would show)."""
    linear = _bf16_linear()
    plain, with_copy = PackedLinear(linear), PackedLinear(linear, fp32_copy=True)
    with_copy.packed_weight_fp32.zero_()
    for rows in (1, 4, FP32_MIN_ROWS - 1):
        x = torch.randn(1, rows, 256, dtype=torch.bfloat16)
        with torch.inference_mode():
            expected = linear(x)
            assert torch.equal(plain(x), expected), rows
            assert torch.equal(with_copy(x), expected), rows
    wide = torch.randn(1, FP32_MIN_ROWS, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert not torch.equal(with_copy(wide), linear(wide))  # from FP32_MIN_ROWS on, the (zeroed) copy is used


def test_wide_inputs_use_the_fp32_copy_and_agree_to_bf16_rounding():
    linear = _bf16_linear()
    packed = PackedLinear(linear, fp32_copy=True)
    assert packed.fp32_copy and packed.packed_weight_fp32.dtype == torch.float32
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
    monkeypatch.setattr(cpu_linear, "wide_gemm_ms", lambda linear: (2.0, 1.0))  # fp32 faster: an emulated-bf16 host
    assert fp32_copy_plan(model, "auto")
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: extra)  # would take all of it
    assert not fp32_copy_plan(model, "auto")
    assert fp32_copy_plan(model, "on") and not fp32_copy_plan(model, "off")
    with pytest.raises(ValueError, match="expected one of"):
        fp32_copy_plan(model, "sometimes")


def test_auto_copies_only_where_fp32_is_measured_faster(monkeypatch):
    model = tiny_model(seed=0).to(torch.bfloat16)
    monkeypatch.setattr(cpu_linear, "available_memory_bytes", lambda: 1 << 40)
    for bf16_ms, fp32_ms, copies in ((2.0, 1.0, True), (1.0, 2.0, False), (1.0, 0.95, False)):  # within 10%: no
        monkeypatch.setattr(cpu_linear, "wide_gemm_ms", lambda linear, b=bf16_ms, f=fp32_ms: (b, f))
        assert bool(fp32_copy_plan(model, "auto")) is copies
    monkeypatch.undo()
    bf16_ms, fp32_ms = cpu_linear.wide_gemm_ms(nn.Linear(256, 384).to(torch.bfloat16))  # a real probe
    assert bf16_ms > 0 and fp32_ms > 0


def test_a_bf16_model_with_copies_matches_it_without():
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
