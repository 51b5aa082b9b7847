"""The engine: owns the models, admits requests, runs rounds, emits token events.

It knows nothing of HTTP. `step()` admits the waiting requests that fit, prefills one chunk of
the oldest prompt not yet prefilled, then runs one speculation round over the sequences ready
to decode (one batch, or one round each with batching off) and returns a token event per
sequence, so a caller (the worker process, the CLI, a benchmark) can stream them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.calibration import Calibrators
from engine.config import TARGET_QUANTIZATION_MODES
from engine.costs import CostModel, LiveCosts, choose_head_kernel, measure_costs
from engine.detokenizer import Detokenizer
from engine.events import MAX_CHOICES, AbortRequest, AddRequest, Admitted, Completion, Prompt, TokenEvent, choice_ids
from engine.grammar import GrammarCompiler, GrammarConstraint
from engine.head import AcceptanceHead
from engine.loading.loader import check_vocabularies, eos_token_ids
from engine.params import SEED_SPACE, SamplingParams, SpecConfig, generation_config_defaults
from engine.policies import make_policy
from engine.runner import ModelRunner
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.speculate import RoundRecord, prefill_chunk, run_round
from engine.stats import RequestStats
from engine.tuning import SelfTuning

log = logging.getLogger(__name__)
if TYPE_CHECKING:
    from engine.distributed import Ranks
    from engine.loading.kernels import KernelChoice

DEFAULT_HEAD = "default"  # the name of the head loaded by --head (or shipped for the draft)


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of a request's choice `choice`: choice 0 keeps the request's seed (its answer is the n=1
    answer), the others step by 2 so no choice's target seed is another's draft seed (seed + 1)."""
    return None if seed is None else (seed + 2 * choice) % SEED_SPACE


class RequestError(ValueError):
    """A request the engine cannot serve; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _is_chat(prompt: Prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def developer_as_system(messages: list[dict], template: str) -> list[dict]:
    """OpenAI's `developer` role is its newer name for `system`: a template that does not know it
    would drop those messages, so they become system messages."""
    if "developer" in template:
        return messages
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


class LLMEngine:
    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None,
        tokenizer: PreTrainedTokenizerBase,
        heads: dict[str, AcceptanceHead] | None = None,
        draft_tokenizer: PreTrainedTokenizerBase | None = None,
        max_model_len: int | None = None,
        default_spec: SpecConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        cpu_fp32_gemm: str = "auto",
        cpu_row_padding: str = "auto",
        draft_quantization: str | KernelChoice = "none",
        quantize_draft_lm_head: bool = True,
        target_quantization: str = "none",
        head_quantization: str | dict[str, str] = "none",
        costs: CostModel | None = None,
        online_calibration: bool = True,
        max_over_acceptance: float = 0.0,
        measure_costs_now: bool = True,
    ) -> None:
        """The models run as given unless a kernel argument asks otherwise ("none" quantizes nothing), so a
        test or a library caller gets no start-up measurement it did not ask for. The product's defaults,
        which measure and choose kernels on the host, are `EngineConfig`'s; `engine.factory` passes them."""
        if default_spec is not None and not default_spec.lossless:
            raise ValueError("over-acceptance is lossy: it is asked for per request, never by the default spec")
        if not 0.0 <= max_over_acceptance <= 1.0:
            raise ValueError("max_over_acceptance must lie in [0, 1]")
        if draft is not None:
            check_vocabularies(target, draft, tokenizer, draft_tokenizer or tokenizer)
        heads = dict(heads or {})
        for name, head in heads.items():
            if draft is None or head.config.hidden_size != draft.config.hidden_size:
                raise ValueError(f"head {name!r} (hidden size {head.config.hidden_size}) does not fit the draft")
        if target_quantization not in TARGET_QUANTIZATION_MODES:  # see there why not w8a8
            raise ValueError(f"target quantization {target_quantization!r}: expected one of "
                             f"{', '.join(TARGET_QUANTIZATION_MODES)}")
        self.target = ModelRunner(target, cpu_fp32_gemm=cpu_fp32_gemm, quantization=target_quantization,
                                  cpu_row_padding=cpu_row_padding)
        self.draft = (
            ModelRunner(draft, cpu_fp32_gemm=cpu_fp32_gemm, quantization=draft_quantization,
                        quantize_lm_head=quantize_draft_lm_head, cpu_row_padding=cpu_row_padding)
            if draft is not None else None
        )
        # each head as it judges fastest here (w8a8 or as trained), and what that choice measured
        self.heads: dict[str, AcceptanceHead] = {}
        self.head_kernels: dict[str, dict] = {}
        for name, head in heads.items():  # a dict: each head's choice, made elsewhere (a follower takes rank 0's)
            requested = head_quantization if isinstance(head_quantization, str) else head_quantization[name]
            self.heads[name], self.head_kernels[name] = choose_head_kernel(
                head.to(self.draft.device), self.draft, requested)
            log.info("head %r kernels: %s", name, self.head_kernels[name])
        # one online calibrator per head and temperature band; `online_calibration` False only measures
        self.calibration = Calibrators(self.heads, learning=online_calibration)
        self.recorder: Callable[[RoundRecord], None] | None = None  # set to log every verified round
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(target, tokenizer)
        self.grammars = GrammarCompiler(tokenizer, self.target.vocab_size, self.eos_token_ids)  # structured output
        limit = getattr(target.config, "max_position_embeddings", None) or 32768
        self.max_model_len = min(max_model_len or limit, limit)
        # what the server applies when a request omits them (vLLM's use of generation_config)
        self.sampling_defaults = generation_config_defaults(getattr(target, "generation_config", None))
        self.default_spec = default_spec or SpecConfig().runnable(DEFAULT_HEAD in heads, draft is not None)
        self.scheduler = Scheduler(scheduler_config or SchedulerConfig())
        self.max_over_acceptance = max_over_acceptance  # the most lossy over-acceptance a request may ask for
        self.requests: dict[str, Sequence] = {}  # every unfinished request, waiting or running
        # Rank 0 of a tensor-parallel target (engine/distributed.py): sends each step's requests to the other ranks.
        self.lockstep: Ranks | None = None
        # Every rank of a tensor-parallel target: a failed round ends the process (the ranks may no longer
        # agree on anything, or one of them is gone), so the supervisor restarts all of them.
        self.on_round_failure: Callable[[Exception], None] | None = None
        # The cost model (`costs`, else measured) behind threshold "auto" and its budgets. Rank 0 of a
        # tensor-parallel target measures later (`start_self_tuning`): its followers must join the forwards.
        self.tuning: SelfTuning | None = None
        self.load_memory: dict | None = None  # host memory of the load, set by engine.factory.build_engine
        if measure_costs_now or costs is not None:
            self.start_self_tuning(costs)

    def start_self_tuning(self, costs: CostModel | None = None) -> None:
        """Start the self-tuning from `costs`, else from a cost model measured now (every rank of a
        tensor-parallel target at once: the target's forwards all-reduce)."""
        if self.draft is not None:
            self.tuning = SelfTuning(LiveCosts(costs or self._measure_costs()))

    def _measure_costs(self) -> CostModel:
        config = self.scheduler.config
        costs = measure_costs(self.target, self.draft, self.heads.get(DEFAULT_HEAD),
                              max_tokens=config.max_num_batched_tokens, max_sequences=config.max_num_seqs)
        log.info("cost model measured on this host: draft step %s s by sequences, target forward %s s by tokens",
                 {b: round(s, 4) for b, s in costs.draft_batch.items()},
                 {n: round(s, 4) for n, s in costs.target.items()})
        return costs

    # ----- requests -------------------------------------------------------------------
    def encode(self, prompt: Prompt, add_special_tokens: bool = True, add_generation_prompt: bool = True) -> list[int]:
        """Token ids for raw text, ids, or chat messages (through the chat template)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if _is_chat(prompt):
            template = getattr(self.tokenizer, "chat_template", None)
            if not template:
                raise RequestError("this model has no chat template; use completions", "messages")
            messages = developer_as_system(prompt, str(template))  # type: ignore[arg-type]
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True)
            if isinstance(out, dict) or hasattr(out, "input_ids"):
                out = out["input_ids"]
            return list(out)
        return [int(t) for t in prompt]  # type: ignore[union-attr]

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        spec: SpecConfig | None = None,
        n: int = 1,
    ) -> list[Admitted]:
        """Admit a request to run with the engine's default spec under the fields `spec` sets
        (the one place a request's spec is merged), as `n` independent choices (`choice_ids`) that
        share the prompt's prefill. Raises RequestError for bad input."""
        spec = self.default_spec.with_overrides(spec)
        if self.lockstep is not None and params.seed is None:  # every rank must sample alike: rank 0 draws
            params = params.model_copy(update={"seed": random.randrange(SEED_SPACE)})
        if not 1 <= n <= MAX_CHOICES:
            raise RequestError(f"n must lie in [1, {MAX_CHOICES}]", "n")
        if spec.over_acceptance > self.max_over_acceptance:
            raise RequestError(
                f"specdec.over_acceptance ({spec.over_acceptance:g}) makes the output deviate from the target's "
                f"distribution; this server allows at most {self.max_over_acceptance:g} (--max-over-acceptance)",
                "specdec.over_acceptance")
        if spec.over_acceptance > 0 and spec.num_drafts > 1:
            raise RequestError("specdec.over_acceptance applies to single-draft verification; it cannot be combined "
                               "with specdec.num_drafts > 1", "specdec.over_acceptance")
        ids = choice_ids(request_id, n)
        if any(i in self.requests for i in ids):
            raise RequestError(f"duplicate request id {request_id!r}")
        head = self._head_for(spec)
        head_name = spec.head or DEFAULT_HEAD
        prompt_ids = self._encode_checked(prompt)
        params = self._bounded(params, len(prompt_ids), "messages" if _is_chat(prompt) else "prompt", n)
        if (field_name := params.token_id_field_beyond(self.target.vocab_size)) is not None:
            raise RequestError(f"{field_name} token ids must lie in [0, {self.target.vocab_size})", field_name)
        grammars = [self._grammar_for(params, spec) for _ in ids]
        seqs = []
        for j, choice_id in enumerate(ids):
            generator, draft_generator = self._generators(choice_seed(params.seed, j))
            seqs.append(Sequence(
                request_id=choice_id,
                prompt_ids=prompt_ids,
                params=params,
                spec=spec,
                policy=make_policy(spec, head),
                head=head,
                calibrator=self.calibration.for_request(head_name, params) if head is not None else None,
                detokenizer=Detokenizer(self.tokenizer, params.stop),
                generator=generator,
                draft_generator=draft_generator,
                eos_token_ids=self.eos_token_ids,
                grammar=grammars[j],
                stats=RequestStats(policy=spec.policy, prompt_tokens=len(prompt_ids),
                                   over_acceptance=spec.over_acceptance),
            ))
        seqs[0].siblings = seqs[1:]  # they fork its prefill (`_share_prefill`)
        for seq in seqs:
            self.requests[seq.request_id] = seq
            self.scheduler.add(seq)
        if self.lockstep is not None:
            self.lockstep.record(AddRequest(request_id, prompt, params, spec, n))
        return [Admitted(seq.request_id, len(prompt_ids), spec) for seq in seqs]

    def _grammar_for(self, params: SamplingParams, spec: SpecConfig) -> GrammarConstraint | None:
        """A fresh grammar for one sequence of a structured request (None for plain text); RequestError for a
        schema the grammar engine cannot compile, or a combination that would leave the grammar unenforced."""
        if params.json_schema is None:
            return None
        if params.ignore_eos:
            raise RequestError("a JSON response ends with EOS; it cannot be combined with ignore_eos", "ignore_eos")
        if not spec.lossless:
            raise RequestError("over-acceptance may accept tokens the grammar forbids; it cannot be combined with a "
                               "JSON response", "specdec.over_acceptance")
        try:
            return self.grammars.constraint(params.json_schema)
        except ValueError as exc:
            raise RequestError(f"invalid JSON schema: {exc}", "response_format") from None

    def _head_for(self, spec: SpecConfig) -> AcceptanceHead | None:
        """The acceptance head `spec` runs with (None unless its policy is specdec++); raises
        RequestError when the spec needs a draft or head that is not loaded."""
        if spec.speculates and self.draft is None:
            raise RequestError(f"policy {spec.policy!r} needs a draft model; none is loaded", "specdec")
        head = self.heads.get(spec.head or DEFAULT_HEAD) if spec.policy == "specdec++" else None
        if spec.policy == "specdec++" and head is None:
            loaded = ", ".join(sorted(self.heads)) or "none is loaded"
            raise RequestError(f"policy 'specdec++' needs an acceptance head {spec.head or DEFAULT_HEAD!r}; "
                               f"heads: {loaded}", "specdec.head")
        return head

    def _encode_checked(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, refused when empty or out of the vocabulary (its length is
        checked against the context by `_bounded`)."""
        prompt_ids = self.encode(prompt)
        if not prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        vocab = self.target.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", "prompt")
        return prompt_ids

    def _generators(self, seed: int | None) -> tuple[torch.Generator, torch.Generator]:
        """The request's sampling generators, target's and draft's: one shared generator, or a
        second one seeded apart (seed + 1) when the draft sits on another device."""
        seed = seed if seed is not None else random.getrandbits(62)
        generator = torch.Generator(device=self.target.device).manual_seed(seed)
        if self.draft is not None and self.draft.device != self.target.device:
            return generator, torch.Generator(device=self.draft.device).manual_seed((seed + 1) % SEED_SPACE)
        return generator, generator

    def _bounded(self, params: SamplingParams, prompt_tokens: int, prompt_param: str, n: int = 1) -> SamplingParams:
        """`params` with max_tokens set: unset, it is the room the prompt leaves in the context and
        in the KV budget (as vLLM does), the budget shared by the `n` choices. A prompt that leaves no
        room is an error naming the prompt; a max_tokens the request set that does not fit, an error
        naming max_tokens; n choices that do not fit the KV budget together, an error naming n."""
        kv_tokens = self.scheduler.config.kv_cache_tokens
        room = min(self.max_model_len, kv_tokens) - prompt_tokens
        if room < 1:
            raise RequestError(
                f"the {prompt_param} ({prompt_tokens} tokens) leaves no room for a completion in the model's "
                f"context length ({self.max_model_len}) and the KV-cache budget "
                f"({kv_tokens} tokens); please shorten the {prompt_param}",
                prompt_param, "context_length_exceeded",
            )
        if params.max_tokens is None:
            room = min(room, kv_tokens // n - prompt_tokens)
            if room < 1:
                raise RequestError(self._too_many_choices(n, prompt_tokens + 1), "n", "context_length_exceeded")
            if params.min_tokens > room:  # set, max_tokens would have been checked against it on validation
                raise RequestError(
                    f"min_tokens ({params.min_tokens}) exceeds the room the {prompt_param} leaves for a completion "
                    f"({room} tokens)", "min_tokens",
                )
            return params.model_copy(update={"max_tokens": room})
        if prompt_tokens + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"{prompt_param} ({prompt_tokens} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"model's context length ({self.max_model_len})",
                "max_tokens", "context_length_exceeded",
            )
        if prompt_tokens + params.max_tokens > kv_tokens:
            raise RequestError(
                f"{prompt_param} plus max_tokens ({prompt_tokens + params.max_tokens} tokens) exceeds the KV-cache "
                f"budget ({kv_tokens} tokens)",
                "max_tokens", "context_length_exceeded",
            )
        if n * (prompt_tokens + params.max_tokens) > kv_tokens:
            raise RequestError(self._too_many_choices(n, prompt_tokens + params.max_tokens), "n",
                               "context_length_exceeded")
        return params

    def _too_many_choices(self, n: int, per_choice: int) -> str:
        return (f"n ({n}) choices of {per_choice} tokens each (prompt plus completion) exceed the KV-cache budget "
                f"({self.scheduler.config.kv_cache_tokens} tokens) together; ask for fewer")

    def abort(self, request_id: str) -> TokenEvent | None:
        """Cancel a request (waiting or running) and free its caches."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        if self.lockstep is not None:
            self.lockstep.record(AbortRequest(request_id))
        self.scheduler.remove(seq)
        seq.finish_reason = "abort"
        seq.free_caches()
        return self._event(seq, [])

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ----- state shared by the ranks of a tensor-parallel target -------------------------
    def shared_state(self) -> dict:
        """State rank 0 decides from its own timings; followers take it (`apply_shared_state`) before
        each step, so every rank decides alike: the self-tuning's cost model (measured and refreshed from
        wall-clock times, which differ by rank) and what it decided from it."""
        return {"tuning": self.tuning.state()} if self.tuning is not None else {}

    def apply_shared_state(self, state: dict) -> None:
        """Take rank 0's `shared_state` (a follower rank, before each step)."""
        if self.tuning is not None and "tuning" in state:
            self.tuning.load_state(state["tuning"])

    # ----- stepping -------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Admit what fits, prefill one chunk of the oldest new prompt, then one speculation
        round for every sequence ready to decode (batched, or one by one with batching off)."""
        if self.lockstep is not None:
            self.lockstep.publish(self)
        events: list[TokenEvent] = []
        self.scheduler.admit()
        chunk = self.scheduler.config.max_num_batched_tokens
        seq = self.scheduler.next_prefill()
        if seq is not None:
            try:
                seq.prefilled = prefill_chunk(seq, self.target, chunk)
                if seq.prefilled:
                    self._share_prefill(seq)
            except Exception as exc:  # a failing request must not take the engine down
                events.extend(self._fail([seq], exc))
        for group in self.scheduler.decode_groups():
            try:
                cap = self.scheduler.candidate_cap(group)
                outputs = run_round(group, self.target, self.draft, cap, chunk, self.recorder, self.tuning,
                                    self.scheduler.load(group))
            except Exception as exc:
                events.extend(self._fail(group, exc))
                continue
            now = time.perf_counter()
            for seq, new_tokens in zip(group, outputs, strict=True):
                if seq.stats.first_token_seconds is None and seq.output_ids:
                    seq.stats.first_token_seconds = now - seq.arrival_time
                if seq.finished:
                    self._release(seq)
                events.append(self._event(seq, new_tokens))
        return events

    def _share_prefill(self, seq: Sequence) -> None:
        """Fork `seq`'s just-prefilled caches to its sibling choices that run already (a sibling still
        waiting for admission prefills on its own later), so a prompt of n choices is prefilled once."""
        for sibling in seq.siblings:
            if sibling in self.scheduler.running and not sibling.prefilled and sibling.target_kv.cached == 0:
                seq.fork_prefill(sibling, self.target, self.draft)
        seq.siblings = []

    def _release(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.requests.pop(seq.request_id, None)

    def _fail(self, seqs: list[Sequence], exc: Exception) -> list[TokenEvent]:
        if self.on_round_failure is not None:
            self.on_round_failure(exc)
        events = []
        for seq in seqs:
            seq.finish_reason = "error"
            seq.free_caches()
            self._release(seq)
            event = self._event(seq, [])
            event.error = f"{type(exc).__name__}: {exc}"
            events.append(event)
        return events

    def _event(self, seq: Sequence, new_tokens: list[int]) -> TokenEvent:
        text = seq.detokenizer.pending_delta(final=seq.finished)
        logprobs = seq.logprobs_of_last(len(new_tokens))
        event = TokenEvent(seq.request_id, token_ids=new_tokens, text=text, logprobs=logprobs)
        if seq.finished:
            seq.stats.generated_tokens = len(seq.output_ids)
            seq.stats.total_seconds = time.perf_counter() - seq.arrival_time
            event.finished, event.finish_reason, event.stats = True, seq.finish_reason, seq.stats
        return event

    def generate(
        self, prompt: Prompt, params: SamplingParams, spec: SpecConfig | None = None
    ) -> Completion:
        """Run one request to completion (other running requests advance too)."""
        request_id = f"generate-{random.getrandbits(48):x}"
        self.add_request(request_id, prompt, params, spec)
        text, token_ids = [], []
        while True:
            for event in self.step():
                if event.request_id != request_id:
                    continue
                text.append(event.text)
                token_ids.extend(event.token_ids)
                if event.finished:
                    if event.error:
                        raise RuntimeError(event.error)
                    return Completion("".join(text), token_ids, event.finish_reason, event.stats.to_dict())
