"""A thin wrapper over a Hugging Face causal LM: forwards with per-sequence KV caches.

It returns the final hidden state (after the final norm) of the positions we need and
their logits, straight from the forward pass already made: no `output_hidden_states`,
and the LM head runs only on the positions whose logits are used.

Batching: every sequence owns a `DynamicCache` of its own length. `forward_batch` lays the
caches side by side (right-padded to the longest), appends each row's new tokens after the
padding, and masks with a 4D mask so a row sees only its own cache and its own causal
prefix; positions are explicit. After the pass each row's new keys/values go back into its
own cache. The copy is tiny next to reading the weights, and rollback stays per sequence.
"""

from __future__ import annotations

import itertools

import torch
from transformers import DynamicCache, PreTrainedModel

from engine.cpu_linear import pack_linears


class ModelRunner:
    def __init__(self, model: PreTrainedModel, pack_cpu_linears: bool = True) -> None:
        self.model = model.eval()
        if pack_cpu_linears:
            pack_linears(model)  # CPU only: about 2x faster decoding, identical results (engine/cpu_linear.py)
        self.decoder = model.get_decoder()
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
        out = self.decoder(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -num_hidden:]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states [..., H] -> [..., V]."""
        return self.lm_head(hidden.to(self.lm_head_device))

    @torch.inference_mode()
    def forward_batch(
        self, feeds: list[torch.Tensor | list[int]], caches: list[DynamicCache], num_logits: list[int]
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
        self, feeds: list[torch.Tensor | list[int]], caches: list[DynamicCache], num_hidden: list[int]
    ) -> list[torch.Tensor]:
        """`forward_batch` without the LM head: per-row final hidden states [n_i, H].

        The head policies decide from the hidden state whether a sequence goes on proposing;
        only those that do need logits, so the LM head (a large share of a small draft's
        weights) runs after the decision, on their rows alone.
        """
        feeds = [torch.as_tensor(f, dtype=torch.long, device=self.device) for f in feeds]
        if len(feeds) == 1:
            return [self._decode(feeds[0].unsqueeze(0), caches[0], num_hidden[0])[0]]
        lengths = [len(f) for f in feeds]
        cached = [c.get_seq_length() for c in caches]
        batch, width, past = len(feeds), max(lengths), max(cached)
        input_ids = torch.zeros(batch, width, dtype=torch.long, device=self.device)
        positions = torch.zeros(batch, width, dtype=torch.long)
        mask = torch.zeros(batch, 1, width, past + width, dtype=torch.bool)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        for i, (feed, n, c) in enumerate(zip(feeds, lengths, cached, strict=True)):
            input_ids[i, :n] = feed
            positions[i] = torch.arange(c, c + width)
            mask[i, 0, :, :c] = True
            mask[i, 0, :, past:] = causal
            mask[i, 0, :, past + n :] = False
            # Padding queries look at themselves only, so no row is all-masked (NaN-free).
            mask[i, 0, torch.arange(n, width), past + torch.arange(n, width)] = True
        batch_cache = self._stacked_cache(caches, cached, past)
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=batch_cache,
            use_cache=True,
        )
        for layer_idx, layer in enumerate(batch_cache.layers):
            for i, (cache, n) in enumerate(zip(caches, lengths, strict=True)):
                cache.update(layer.keys[i : i + 1, :, past : past + n], layer.values[i : i + 1, :, past : past + n],
                             layer_idx)
        return [out.last_hidden_state[i, n - k : n] for i, (n, k) in enumerate(zip(lengths, num_hidden, strict=True))]

    def _stacked_cache(self, caches: list[DynamicCache], cached: list[int], past: int) -> DynamicCache:
        """One batch cache: each row's keys/values right-padded with zeros to `past`."""
        batch_cache = self.new_cache()
        if past == 0:
            return batch_cache
        for layer_idx in range(self.num_layers):
            keys, values = [], []
            for cache, c in zip(caches, cached, strict=True):
                if c == 0:
                    ref = next(x for x, n in zip(caches, cached, strict=True) if n > 0).layers[layer_idx].keys
                    keys.append(ref.new_zeros(1, ref.shape[1], past, ref.shape[3]))
                    values.append(ref.new_zeros(1, ref.shape[1], past, ref.shape[3]))
                    continue
                layer = cache.layers[layer_idx]
                pad = (0, 0, 0, past - c)
                keys.append(torch.nn.functional.pad(layer.keys, pad))
                values.append(torch.nn.functional.pad(layer.values, pad))
            batch_cache.update(torch.cat(keys), torch.cat(values), layer_idx)
        return batch_cache


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Roll the cache back to its first `length` positions (transformers 5: crop(-n) drops n)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)
