"""Grouped-query attention on the CPU (engine/loading/attention.py): the same attention as transformers'
`sdpa` for one new token, a few new tokens under a causal or a packed-batch mask, and an additive
mask; a causal prefill and many new tokens go to `sdpa` itself; a CPU model is switched to it and says so."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model
from transformers import Qwen2Config
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from engine.loading import attention
from engine.loading.attention import FEW_QUERIES, GROUPED_QUERY_ATTENTION, grouped_query_attention
from engine.runner import ModelRunner, crop_cache

HEADS, KV_HEADS, DIM = 6, 2, 16


def attention_layer() -> torch.nn.Module:
    """What an attention function reads from its module: a Qwen2 attention layer of HEADS / KV_HEADS heads."""
    config = Qwen2Config(hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    return Qwen2Attention(config, layer_idx=0)


def reference(query, key, value, mask):
    """Attention per query head in fp64, each reading its key/value head: what every path must equal."""
    key, value = repeat_kv(key.double(), HEADS // KV_HEADS), repeat_kv(value.double(), HEADS // KV_HEADS)
    scores = query.double() @ key.transpose(-1, -2) / DIM**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1) @ value).transpose(1, 2)  # [B, q, H, D]


def inputs(batch: int, queries: int, cached: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(queries * 100 + cached)
    q = torch.randn(batch, HEADS, queries, DIM, generator=g, dtype=dtype)
    k = torch.randn(batch, KV_HEADS, cached + queries, DIM, generator=g, dtype=dtype)
    v = torch.randn(batch, KV_HEADS, cached + queries, DIM, generator=g, dtype=dtype)
    return q, k, v


def causal(queries: int, keys: int) -> torch.Tensor:
    return torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)[None, None]


def packed_batch_mask(lengths: list[int], cached: list[int]) -> torch.Tensor:
    """Rows' caches back to back, then their new tokens back to back (engine/runner.py's packed batch)."""
    past, total = sum(cached), sum(lengths)
    mask = torch.zeros(1, 1, total, past + total, dtype=torch.bool)
    k0 = q0 = 0
    for n, c in zip(lengths, cached, strict=True):
        mask[0, 0, q0 : q0 + n, k0 : k0 + c] = True
        mask[0, 0, q0 : q0 + n, past + q0 : past + q0 + n] = torch.ones(n, n, dtype=torch.bool).tril()
        k0, q0 = k0 + c, q0 + n
    return mask


@pytest.mark.parametrize(("queries", "mask_kind"), [(1, None), (1, "bool"), (5, "bool"), (5, "float"),
                                                     (FEW_QUERIES, "bool"), (FEW_QUERIES + 1, "bool"),
                                                     (7, "packed"), (9, None)])
def test_equals_per_head_attention(queries, mask_kind):
    cached = 33 if mask_kind is not None or queries == 1 else 0  # no mask over several tokens: a causal prefill
    q, k, v = inputs(2 if mask_kind != "packed" else 1, queries, cached)
    mask = None
    if mask_kind == "bool":
        mask = causal(queries, cached + queries)
    elif mask_kind == "float":
        mask = torch.where(causal(queries, cached + queries), 0.0, float("-inf")) + torch.randn(1, 1, queries, 1)
    elif mask_kind == "packed":  # 3, 1 and 3 new tokens of three sequences over caches of 20, 12 and 1 tokens
        mask = packed_batch_mask([3, 1, 3], [20, 12, 1])
    out, weights = grouped_query_attention(attention_layer(), q, k, v, mask, scaling=DIM**-0.5)
    assert weights is None
    assert out.shape == (q.shape[0], queries, HEADS, DIM)
    expected = reference(q, k, v, mask if mask is not None or queries == 1 else causal(queries, queries))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_a_wrong_grouping_is_caught():
    """Control: query heads read from the wrong key/value head (interleaved instead of consecutive) differ, so
    the comparison above can fail."""
    q, k, v = inputs(1, 1, 40)
    swapped = q.view(1, KV_HEADS, HEADS // KV_HEADS, 1, DIM).transpose(1, 2).reshape(1, HEADS, 1, DIM)
    out, _ = grouped_query_attention(attention_layer(), swapped, k, v, None, scaling=DIM**-0.5)
    assert not torch.allclose(out.double(), reference(q, k, v, None), atol=1e-3)


def test_a_prefill_and_many_queries_go_to_sdpa(monkeypatch):
    """A causal prefill without a mask, and more than FEW_QUERIES new tokens, run transformers' `sdpa` itself."""
    calls = []

    def sdpa(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return None, None

    monkeypatch.setattr(attention, "sdpa_attention_forward", sdpa)
    q, k, v = inputs(1, 9, 0)
    grouped_query_attention(attention_layer(), q, k, v, None, scaling=DIM**-0.5)  # a prompt's prefill
    many = FEW_QUERIES + 1
    q, k, v = inputs(1, many, 30)
    grouped_query_attention(attention_layer(), q, k, v, causal(many, 30 + many), scaling=DIM**-0.5)
    q, k, v = inputs(1, 1, 30)
    grouped_query_attention(attention_layer(), q, k, v, None, scaling=DIM**-0.5)  # one new token: packed
    assert calls == [9, FEW_QUERIES + 1]


def test_cpu_model_runs_it_with_the_same_logits():
    """A CPU runner switches its model and reports it; prefill, decode and a verification's few tokens give the
    logits of the same model under `sdpa`."""
    runner = ModelRunner(tiny_model(seed=3), pack_cpu_linears=False)
    assert runner.kernels.attention == GROUPED_QUERY_ATTENTION
    ids = torch.randint(1, 30, (1, 60), generator=torch.Generator().manual_seed(0))
    results = {}
    for impl in ["sdpa", GROUPED_QUERY_ATTENTION]:
        runner.model.set_attn_implementation(impl)
        cache = runner.new_cache()
        prefill = runner.forward(ids[:, :50], cache, num_logits=50)[1]
        decode = runner.forward(ids[:, 50:51], cache)[1]
        verify = runner.forward(ids[:, 51:56], cache, num_logits=5)[1]
        crop_cache(cache, 51)
        batch = runner.forward_batch([ids[0, 51:54], ids[0, 51:52]], [cache, runner.new_cache()], [3, 1])[1]
        results[impl] = [prefill, decode, verify, *batch]
    for a, b in zip(results["sdpa"], results[GROUPED_QUERY_ATTENTION], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
