"""Grouped-query attention over few new tokens on the CPU, through torch's own SDPA.

Decoding and verification attend from one or a few new tokens to a long cache. For a
grouped-query model (several query heads per key/value head, as in Qwen2 and Llama), transformers'
`sdpa` path on the CPU hands torch's SDPA the query heads with `enable_gqa`, and torch's CPU kernel
then runs one tiny attention per query head: a few hundred microseconds a layer at a few hundred
cached tokens, growing with the cache, and as much as a decoder layer's weights cost a small draft.
Here the query heads that share a key/value head become rows of one attention over that head
(what transformers itself does on accelerators for one query, `pack_gqa`), with each row's mask its
query's. The softmax is per row, so every row computes what it did before, by the same kernel.
Measured in docs/benchmarks/README.md ("Attention over few new tokens").

Forwards over many new tokens (a prompt's prefill: causal without a mask) and models without grouped
heads go to transformers' `sdpa` unchanged; so does everything on an accelerator.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

GROUPED_QUERY_ATTENTION = "specdecpp_grouped_query_sdpa"
FEW_QUERIES = 16  # new tokens per forward up to which query heads are packed (verification of a round: k + 1)


def grouped_query_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: query [B, H, q, D], key/value [B, KV, L, D] -> ([B, q, H, D], None).

    The G = H / KV query heads of a key/value head become G x q rows of one SDPA over it; a mask
    [B|1, 1, q, L] is tiled to those rows. One new token needs no mask (it sees the whole cache)."""
    batch, heads, queries, dim = query.shape
    groups = heads // key.shape[1]
    mask_broadcasts = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    packable = (
        query.device.type == "cpu" and groups > 1 and dropout == 0.0 and mask_broadcasts
        and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
        and (queries == 1 or (attention_mask is not None and queries <= FEW_QUERIES))
    )
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    rows = query.reshape(batch, heads // groups, groups * queries, dim)  # head h = kv * G + g -> row g * q + i
    mask = attention_mask.repeat(1, 1, groups, 1) if attention_mask is not None and queries > 1 else attention_mask
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=scaling)
    return out.view(batch, heads, queries, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_QUERY_ATTENTION, grouped_query_attention)
AttentionMaskInterface.register(GROUPED_QUERY_ATTENTION, sdpa_mask)  # the masks `sdpa` gets, for the same calls


def use_grouped_query_attention(model: PreTrainedModel) -> None:
    """Switch a CPU model that runs transformers' `sdpa` attention to `grouped_query_attention`."""
    if model.device.type == "cpu" and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GROUPED_QUERY_ATTENTION)
