"""Structured output: a JSON schema compiled into a grammar (llguidance) that masks q and p alike.

A grammar is one more modification of the target's distribution, like the penalties of
engine/sampling.py: at every position the tokens that cannot continue a valid output get -inf, in the
draft's q and the target's p alike, with the candidates before that position in the history. The
speculative output then follows the constrained target exactly. One matcher per sequence follows the
speculation: it consumes candidates as they are drawn and rolls back to the accepted length when the
next round asks about a history that parted from the one it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import llguidance
import llguidance.hf
import torch
from llguidance._tokenizer import TokenizerWrapper
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Whitespace between JSON tokens: what models write (spaces, newlines, indentation), bounded so that a
# weak model cannot pad a document forever.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}
BITS = torch.arange(32, dtype=torch.int32)


class GrammarCompiler:
    """Compiles a request's JSON schema against the target's tokenizer. The tokenizer's grammar form is
    built once, on the first structured request (about 2 s for a 150k vocabulary)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Collection[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width
        self.eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def constraint(self, json_schema: str) -> GrammarConstraint:
        """A fresh constraint for one sequence; ValueError (llguidance's message) for a schema it cannot compile."""
        tokenizer = self.ll_tokenizer
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_OPTIONS)
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a Rust panic surfaces as pyo3's PanicException, a BaseException
            raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        if matcher.is_error():
            raise ValueError(matcher.get_error().splitlines()[0])
        return GrammarConstraint(matcher, self.vocab_size, self.eos_token_ids, tokenizer.vocab_size)

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            width = max(self.vocab_size, len(self.tokenizer))
            try:  # the tokenizer's own byte-level form (BPE, SentencePiece)
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=width,
                                                                  eos_token=self.eos_token_ids)
            except ValueError:  # any other fast tokenizer: each token's text as its bytes
                self._ll_tokenizer = llguidance.LLTokenizer(
                    TokenizerWrapper(TokenBytes(self.tokenizer, self.eos_token_ids)), n_vocab=width,
                    eos_token=self.eos_token_ids)
        return self._ll_tokenizer


class TokenBytes:
    """A tokenizer as llguidance's TokenizerWrapper reads it: every token's bytes, decoded alone (exact for
    tokenizers whose tokens are whole characters, the ones `llguidance.hf` cannot read)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: list[int]) -> None:
        specials = set(tokenizer.all_special_ids) | set(eos_token_ids)
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(specials)
        self.tokens = [b"" if i in specials else tokenizer.decode([i]).encode() for i in range(len(tokenizer))]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        return self.tokenizer.encode(text, add_special_tokens=False)


class GrammarConstraint:
    """One sequence's grammar: which tokens may come next after its output and some candidates."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_token_ids: list[int],
                 matcher_vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_only = torch.zeros(vocab_size, dtype=torch.bool)
        self.eos_only[eos_token_ids] = True
        self._bitmask = allocate_token_bitmask(1, matcher_vocab_size)
        self._consumed: list[int] = []  # what the matcher has consumed, in order
        self._final = 0  # how many of them are output, never rolled back again
        self._masks: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}  # (output length, candidates) -> [V]
        self._masks_output_length = 0  # the output length the kept masks start from
        self._broken = False

    def apply(self, logits: torch.Tensor, output_ids: list[int], drafted: list[torch.Tensor]) -> torch.Tensor:
        """Mask logits [R, V] of R consecutive positions (the last after `output_ids` and all of `drafted`,
        each row before it one candidate fewer: the rule of `LogitAdjuster.apply`). A row the request's
        penalties left without any allowed token keeps the allowed tokens, uniformly."""
        rows = logits.shape[0]
        candidates = torch.cat(drafted).tolist() if drafted else []
        start = len(candidates) - rows + 1
        allowed = torch.stack([self.allowed(output_ids, candidates[: start + r]) for r in range(rows)])
        allowed = allowed.to(logits.device)
        masked = logits.masked_fill(~allowed, float("-inf"))
        dead = ~torch.isfinite(masked).any(-1)
        if bool(dead.any()):
            masked[dead] = torch.zeros_like(masked[dead]).masked_fill(~allowed[dead], float("-inf"))
        return masked

    def allowed(self, output_ids: list[int], candidates: list[int]) -> torch.Tensor:
        """Which tokens [V] (bool, CPU) may follow the output and `candidates`."""
        key = (len(output_ids), tuple(candidates))
        if key not in self._masks:
            if len(output_ids) > self._masks_output_length:  # the output grew: older rounds' masks go
                self._masks = {k: v for k, v in self._masks.items() if k[0] >= len(output_ids)}
                self._masks_output_length = len(output_ids)
            self._masks[key] = self._compute(output_ids, candidates)
        return self._masks[key]

    def _compute(self, output_ids: list[int], candidates: list[int]) -> torch.Tensor:
        self._sync(output_ids, candidates)
        # After the grammar's end (or an impossible state) only EOS may come: the sequence ends there.
        if self._broken or len(self._consumed) < len(output_ids) + len(candidates) or self.matcher.is_stopped():
            return self.eos_only
        fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        bits = (self._bitmask[0].unsqueeze(-1) >> BITS) & 1
        allowed = bits.flatten()[: self.vocab_size].bool()
        return allowed if bool(allowed.any()) else self.eos_only

    def _sync(self, output_ids: list[int], candidates: list[int]) -> None:
        """Make the matcher hold output + candidates (up to where the grammar stops): roll back to where
        what it holds parts from them, then consume the rest."""
        n_out = len(output_ids)

        def token(i: int) -> int:
            return output_ids[i] if i < n_out else candidates[i - n_out]

        total = n_out + len(candidates)
        common = min(self._final, len(self._consumed))  # the output it holds is never rolled back
        limit = min(len(self._consumed), total)
        while common < limit and self._consumed[common] == token(common):
            common += 1
        if common < len(self._consumed) and not self._broken:
            self._check(self.matcher.rollback(len(self._consumed) - common), "rollback")
            del self._consumed[common:]
        for i in range(len(self._consumed), total):
            if self._broken or self.matcher.is_stopped():  # nothing follows the end: never consume past it
                break
            self._check(self.matcher.consume_token(token(i)), "consume")
            self._consumed.append(token(i))
        self._final = min(len(self._consumed), n_out)

    def _check(self, ok: bool, what: str) -> None:
        """Tokens come only from masked distributions, so a failure is a bug: end the sequence (EOS only)
        rather than let the grammar go unenforced."""
        if not ok and not self._broken:
            self._broken = True
            log.error("grammar matcher failed to %s; the sequence ends here: %s", what,
                      self.matcher.get_error().splitlines()[0] if self.matcher.get_error() else "no message")
