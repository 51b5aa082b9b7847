"""A thin wrapper over a Hugging Face causal LM: forwards with per-sequence KV caches.

It returns the final hidden state (after the final norm) of the positions we need and
their logits, straight from the forward pass already made: no `output_hidden_states`,
and the LM head runs only on the positions whose logits are used.

Batching: every sequence owns a `DynamicCache` of its own length. `forward_batch` packs the
batch ragged, like vLLM's flattened batches: one row holding every sequence's new tokens back
to back (no padding: on a compute-bound device a padded slot costs as much as a real token),
attending to one cache made of every sequence's keys/values back to back, with a 4D mask so
each token sees only its own sequence's cache and causal prefix; positions are explicit.
After the pass each sequence's new keys/values go back into its own cache. The copies are
small next to reading the weights, and rollback stays per sequence.

A row may also read a cache it shares with other rows (`SharedPrefixCache`): the M draft paths of one
sequence (engine/multidraft.py) each see the sequence's cache, packed once, and then only their own tokens.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache, PreTrainedModel

from engine.loading.attention import use_grouped_query_attention
from engine.loading.cpu_linear import PackedLinear, pack_linears
from engine.loading.kernels import KernelChoice, choose_and_quantize, row_padding_plan


@dataclass
class SharedPrefixCache:
    """A row's cache made of `prefix`, read but never written (shared by the rows of one sequence's draft
    paths), then `own`, which receives the row's new keys/values."""

    prefix: DynamicCache
    own: DynamicCache

    def get_seq_length(self) -> int:
        return self.prefix.get_seq_length() + self.own.get_seq_length()


RowCache = DynamicCache | SharedPrefixCache


class ModelRunner:
    """Owns `model` from here on: on the CPU its linears are swapped in place for packed ones (same
    results, faster kernels), so a caller who needs the untouched modules passes a copy."""

    def __init__(
        self,
        model: PreTrainedModel,
        pack_cpu_linears: bool = True,
        cpu_fp32_gemm: str = "auto",
        quantization: str | KernelChoice = "none",
        quantize_lm_head: bool = False,
        cpu_row_padding: str = "auto",
    ) -> None:
        self.model = model.eval()
        # Weight-only int8/int4 where asked ("auto": where it measures faster here), the LM head too where
        # asked and faster; before packing, which then packs what stays a plain linear layer.
        self.kernels = choose_and_quantize(model, quantization, lm_head=quantize_lm_head)
        if pack_cpu_linears:
            # CPU only; with fp32 copies (`cpu_fp32_gemm`) for wide GEMMs where bf16 ones are slow
            # (engine/loading/cpu_linear.py; measured in docs/benchmarks/README.md, CPU kernels).
            pack_linears(model, fp32_copies=cpu_fp32_gemm)
            copies = [m for m in model.modules() if isinstance(m, PackedLinear) and m.fp32_copy]
            # A replayed choice brings its row padding too (a follower rank's draft proposes as rank 0's).
            padding = quantization.row_padding if isinstance(quantization, KernelChoice) else cpu_row_padding
            self.kernels = replace(self.kernels, fp32_copies=len(copies),
                                   fp32_min_rows=copies[0].fp32_min_rows if copies else None,
                                   row_padding=row_padding_plan(model, padding))
        # On the CPU, query heads sharing a key/value head attend as rows of one SDPA (engine/loading/attention.py).
        use_grouped_query_attention(model)
        self.kernels = replace(self.kernels, attention=model.config._attn_implementation)
        self.decoder = model.get_decoder()
        # Newer transformers call the decoder's cache argument `cache` (`past_key_values` is deprecated there).
        accepts = inspect.signature(self.decoder.forward).parameters
        self._cache_arg = "cache" if "cache" in accepts else "past_key_values"
        self.lm_head = model.get_output_embeddings()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.hidden_size: int = model.config.hidden_size
        self.vocab_size: int = self.lm_head.out_features
        # Under a device map the LM head may sit on another device than the first layer.
        self.lm_head_device = next(itertools.chain(self.lm_head.parameters(), self.lm_head.buffers())).device
        self.num_layers: int = model.config.num_hidden_layers

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def synchronize(self) -> None:
        """Wait for the work queued on the model's GPUs: CUDA runs asynchronously, so a timed region that
        ends without this charges its queued forwards to whatever waits next. Nothing to do on the CPU."""
        for device in {self.device, self.lm_head_device}:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, cache: DynamicCache, num_logits: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [1, T] appended after the cache -> (hidden [1, n, H], logits [1, n, V]).

        `n = num_logits` last positions; the cache grows by T.
        """
        hidden = self._decode(input_ids.to(self.device), cache, num_logits)
        return hidden, self.logits(hidden)

    def _decode(self, input_ids: torch.Tensor, cache: DynamicCache, num_hidden: int) -> torch.Tensor:
        """One sequence [1, T] through the decoder -> final hidden states [1, n, H] of its last n positions."""
        out = self.decoder(input_ids=input_ids, use_cache=True, **{self._cache_arg: cache})
        return out.last_hidden_state[:, -num_hidden:]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states [..., H] -> [..., V]."""
        return self.lm_head(hidden.to(self.lm_head_device))

    @torch.inference_mode()
    def forward_batch(
        self, feeds: list[torch.Tensor | list[int]], caches: list[RowCache], num_logits: list[int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Row i appends feeds[i] (1-D token ids) to caches[i]; returns per-row hidden [n_i, H] and
        logits [n_i, V] for its last n_i = num_logits[i] positions.

        Token tensors may stay on the device: nothing here waits for the device.
        """
        rows = self.hidden_batch(feeds, caches, num_logits)
        flat = self.logits(torch.cat(rows))
        return rows, list(flat.split(list(num_logits)))

    @torch.inference_mode()
    def hidden_batch(
        self, feeds: list[torch.Tensor | list[int]], caches: list[RowCache], num_hidden: list[int]
    ) -> list[torch.Tensor]:
        """`forward_batch` without the LM head: per-row final hidden states [n_i, H].

        For forwards whose logits nobody reads (the draft catching up on accepted tokens).
        """
        feeds = [torch.as_tensor(f, dtype=torch.long, device=self.device) for f in feeds]
        if len(feeds) == 1 and isinstance(caches[0], DynamicCache):
            return [self._decode(feeds[0].unsqueeze(0), caches[0], num_hidden[0])[0]]
        lengths = [len(f) for f in feeds]
        segments, row_segments = cache_segments(caches)
        segment_lengths = [c.get_seq_length() for c in segments]
        positions, mask = packed_positions_and_mask(lengths, row_segments, segment_lengths)
        batch_cache = self._packed_cache(segments, segment_lengths)
        out = self.decoder(
            input_ids=torch.cat(feeds).unsqueeze(0),
            attention_mask=mask.to(self.device),
            position_ids=positions.unsqueeze(0).to(self.device),
            use_cache=True,
            **{self._cache_arg: batch_cache},
        )
        past, query_starts = sum(segment_lengths), list(itertools.accumulate(lengths, initial=0))
        writable = [c.own if isinstance(c, SharedPrefixCache) else c for c in caches]
        for layer_idx, layer in enumerate(batch_cache.layers):  # each row's new keys/values into its own cache
            for cache, n, q in zip(writable, lengths, query_starts[:-1], strict=True):
                new = slice(past + q, past + q + n)
                cache.update(layer.keys[:, :, new], layer.values[:, :, new], layer_idx)
        hidden = out.last_hidden_state[0]
        return [hidden[q + n - k : q + n] for q, n, k in zip(query_starts[:-1], lengths, num_hidden, strict=True)]

    def _packed_cache(self, segments: list[DynamicCache], lengths: list[int]) -> DynamicCache:
        """One cache holding every segment's keys/values (`lengths[i]` of segment i) back to back along the
        sequence axis."""
        batch_cache = self.new_cache()
        filled = [c for c, n in zip(segments, lengths, strict=True) if n > 0]
        if not filled:
            return batch_cache
        for layer_idx in range(self.num_layers):
            layers = [c.layers[layer_idx] for c in filled]
            keys = torch.cat([layer.keys for layer in layers], dim=2)
            values = torch.cat([layer.values for layer in layers], dim=2)
            batch_cache.update(keys, values, layer_idx)
        return batch_cache


def cache_segments(caches: list[RowCache]) -> tuple[list[DynamicCache], list[list[int]]]:
    """The distinct caches the rows read (a shared prefix once), and each row's segments in reading order."""
    segments: list[DynamicCache] = []
    index: dict[int, int] = {}
    row_segments = []
    for cache in caches:
        parts = [cache.prefix, cache.own] if isinstance(cache, SharedPrefixCache) else [cache]
        for part in parts:
            if id(part) not in index:
                index[id(part)] = len(segments)
                segments.append(part)
        row_segments.append([index[id(part)] for part in parts])
    return segments, row_segments


def packed_positions_and_mask(
    lengths: list[int], row_segments: list[list[int]], segment_lengths: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [T] and attention mask [1, 1, T, past + T] of a packed batch. Keys are the cache segments back
    to back (`past` in all), then every row's new tokens back to back. Row i's `lengths[i]` new tokens follow
    its segments `row_segments[i]` (a shared prefix, then its own; or one cache of its own), and see only
    those and their own causal prefix."""
    past, total = sum(segment_lengths), sum(lengths)
    key_starts = list(itertools.accumulate(segment_lengths, initial=0))
    query_starts = list(itertools.accumulate(lengths, initial=0))
    cached = [sum(segment_lengths[s] for s in segs) for segs in row_segments]
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(cached, lengths, strict=True)])
    mask = torch.zeros(1, 1, total, past + total, dtype=torch.bool)
    for i, n in enumerate(lengths):
        rows = slice(query_starts[i], query_starts[i] + n)
        for s in row_segments[i]:
            mask[0, 0, rows, key_starts[s] : key_starts[s] + segment_lengths[s]] = True
        own = past + query_starts[i]
        mask[0, 0, rows, own : own + n] = torch.ones(n, n, dtype=torch.bool).tril()
    return positions, mask


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Roll the cache back to its first `length` positions (transformers 5: crop(-n) drops n)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)
