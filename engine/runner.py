"""A thin wrapper over a Hugging Face causal LM: one forward with a KV cache.

It returns the final hidden state (after the final norm) of the positions we need and
their logits, straight from the forward pass already made: no `output_hidden_states`,
and the LM head runs only on the positions whose logits are used.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel


class ModelRunner:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.hidden_size: int = model.config.hidden_size
        self.vocab_size: int = self.lm_head.weight.shape[0]

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, cache: DynamicCache, num_logits: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] appended after the cache -> (hidden [B, n, H], logits [B, n, V]).

        `n = num_logits` last positions; the cache grows by T.
        """
        out = self.decoder(input_ids=input_ids.to(self.device), past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -num_logits:]
        logits = self.lm_head(hidden.to(self.lm_head.weight.device))
        return hidden, logits


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Roll the cache back to its first `length` positions (transformers 5: crop(-n) drops n)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)
