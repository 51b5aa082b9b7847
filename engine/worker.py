"""The engine process: build the engine from a plain config, then serve a message queue.

The server spawns `run_worker` in its own process and talks to it only with the messages of
engine/events.py:

  in:  AddRequest, AbortRequest, TokenizeRequest, DetokenizeRequest, Shutdown
  out: EngineReady or EngineFailed, then Admitted or RequestRejected per request,
       TokenEvent (one per request per step; the last one carries the RequestStats),
       Tokenized or Detokenized (or RequestRejected) per tokenizer query,
       EngineLoad (whenever the engine's load changes),
       EngineCosts (the live cost model, at most every COSTS_REPORT_SECONDS while busy)
       CalibrationReport (the acceptance heads' online calibrators, while they learn)

The parameters arrive validated (by the server). The sampling fields a request left unset take
the target's generation_config values (`LLMEngine.sampling_defaults`, as vLLM's server does);
then they are handed to the engine as they are.
The loop blocks on the inbox while idle and otherwise steps the engine, draining whatever
arrived in between, so a new request or an abort waits at most one step.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import queue
import time
from typing import Any

from engine.events import (
    AbortRequest,
    AddRequest,
    CalibrationReport,
    Detokenized,
    DetokenizeRequest,
    EngineCosts,
    EngineFailed,
    EngineLoad,
    EngineReady,
    RequestRejected,
    Shutdown,
    ToEngine,
    Tokenized,
    TokenizeRequest,
)
from engine.params import MODEL_DEFAULT_FIELDS, SamplingParams

log = logging.getLogger(__name__)
IDLE_POLL_SECONDS = 1.0  # how often an idle worker checks that its parent is still alive
COSTS_REPORT_SECONDS = 5.0  # least time between two EngineCosts reports
CALIBRATION_REPORT_SECONDS = 5.0  # most often the calibrators are reported while requests run (also at each finish)


def run_worker(config: dict, inbox: Any, outbox: Any, log_level: str = "INFO") -> None:
    """Process entry point (must stay importable for the spawn start method)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s engine[%(process)d]: %(message)s")
    try:
        engine, ready = _build(config)
    except Exception as exc:  # report why, then exit: the server decides whether to retry
        log.exception("engine failed to start")
        outbox.put(EngineFailed(f"{type(exc).__name__}: {exc}"))
        return
    outbox.put(ready)
    EngineLoop(engine, inbox, outbox).run()
    if engine.lockstep is not None:  # a tensor-parallel target: the other ranks leave with this one
        engine.lockstep.close()


def _build(config: dict) -> tuple[Any, EngineReady]:
    from engine.config import EngineConfig
    from engine.factory import build_engine, resolve_paths
    from engine.loading.kernels import cpu_features
    from engine.loading.loader import model_identity

    engine_config = EngineConfig.from_dict(config)
    engine = build_engine(engine_config)
    target, draft, head = resolve_paths(engine_config)
    ready = EngineReady(
        model=model_identity(target),
        draft=model_identity(draft) if draft else None,
        head=head,
        heads={name: {"timing": h.timing, "kernels": engine.head_kernels[name]} for name, h in engine.heads.items()},
        max_model_len=engine.max_model_len,
        default_spec=engine.default_spec,
        scheduler=dataclasses.asdict(engine.scheduler.config),  # batching, max_num_seqs, ...
        sampling_defaults=effective_sampling_defaults(engine.sampling_defaults),
        kernels={"host": cpu_features(), "target": engine.target.kernels.describe(),
                 "draft": engine.draft.kernels.describe() if engine.draft is not None else None},
        costs=engine.tuning.costs.measured.to_dict() if engine.tuning is not None else None,
        memory=engine.load_memory,
    )
    return engine, ready


def effective_sampling_defaults(model_defaults: dict) -> dict:
    """What a request that omits temperature, top_p and top_k samples with: the model's
    generation_config where it sets them, SamplingParams' defaults elsewhere (for /v1/models)."""
    params = SamplingParams().with_defaults(model_defaults)
    return {name: getattr(params, name) for name in MODEL_DEFAULT_FIELDS}


class EngineLoop:
    """Drain messages, step, push events; one instance per engine process."""

    def __init__(self, engine: Any, inbox: Any, outbox: Any) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.stopping = False
        self._load: tuple[int, int] = (0, 0)
        self._costs_reported = time.monotonic()  # EngineReady carried the measured model
        self._calibration_reported: tuple[int, float] = (0, 0.0)  # labels seen and time at the last report

    def run(self) -> None:
        while not self.stopping:
            self.drain(block=not self.engine.has_unfinished())
            if self.stopping:
                break
            if self.engine.has_unfinished():
                events = self.engine.step()
                self.report_calibration(finished=any(event.finished for event in events))
                for event in events:
                    self.outbox.put(event)
                self.report_costs()
            self.report_load()
        for request_id in list(self.engine.requests):  # shutdown: cancel what is left, cleanly
            self.abort(request_id)
        self.report_load()

    def drain(self, block: bool) -> None:
        """Handle every waiting message; when `block`, wait for at least one."""
        while True:
            try:
                message = self.inbox.get(timeout=IDLE_POLL_SECONDS) if block else self.inbox.get_nowait()
            except queue.Empty:
                if block and not _parent_alive():
                    self.stopping = True
                    return
                if block:
                    continue
                return
            except (EOFError, OSError):  # the parent is gone
                self.stopping = True
                return
            self.handle(message)
            block = False
            if self.stopping:
                return

    def handle(self, message: ToEngine) -> None:
        if isinstance(message, AddRequest):
            self.add(message)
        elif isinstance(message, AbortRequest):
            self.abort(message.request_id)
        elif isinstance(message, (TokenizeRequest, DetokenizeRequest)):
            self.answer(message)
        elif isinstance(message, Shutdown):
            self.stopping = True
        else:
            log.warning("ignoring unknown message %r", message)

    def add(self, request: AddRequest) -> None:
        from engine.llm_engine import RequestError

        params = request.params.with_defaults(self.engine.sampling_defaults)
        try:
            admitted = self.engine.add_request(request.request_id, request.prompt, params, request.spec, request.n)
        except RequestError as exc:
            self.reject(request, str(exc), exc.param, exc.code)
            return
        except ValueError as exc:  # from the prompt (tokenizer, ids): a bad request, not a bad engine
            self.reject(request, str(exc), None, "invalid_request")
            return
        except Exception as exc:
            log.exception("add_request failed for %s", request.request_id)
            self.reject(request, f"{type(exc).__name__}: {exc}", None, "internal_error")
            return
        for message in admitted:
            self.outbox.put(message)

    def reject(self, request: AddRequest, message: str, param: str | None, code: str | None) -> None:
        """Every choice of `request` hears why it was refused."""
        for choice_id in request.choice_ids:
            self.outbox.put(RequestRejected(choice_id, message, param, code))

    def answer(self, query: TokenizeRequest | DetokenizeRequest) -> None:
        """A tokenizer query, between steps; a bad prompt or token id is a RequestRejected naming it."""
        from engine.llm_engine import RequestError

        try:
            self.outbox.put(self._tokenize(query) if isinstance(query, TokenizeRequest) else self._detokenize(query))
        except RequestError as exc:
            self.outbox.put(RequestRejected(query.request_id, str(exc), exc.param, exc.code))
        except ValueError as exc:  # from the tokenizer: a bad query, not a bad engine
            self.outbox.put(RequestRejected(query.request_id, str(exc), None, "invalid_request"))
        except Exception as exc:
            log.exception("tokenizer query %s failed", query.request_id)
            self.outbox.put(RequestRejected(query.request_id, f"{type(exc).__name__}: {exc}", None, "internal_error"))

    def _tokenize(self, query: TokenizeRequest) -> Tokenized:
        tokens = self.engine.encode(query.prompt, query.add_special_tokens, query.add_generation_prompt)
        return Tokenized(query.request_id, tokens, self.engine.max_model_len)

    def _detokenize(self, query: DetokenizeRequest) -> Detokenized:
        from engine.llm_engine import RequestError

        vocab = len(self.engine.tokenizer)
        if any(t < 0 or t >= vocab for t in query.tokens):
            raise RequestError(f"tokens must lie in [0, {vocab})", "tokens", "invalid_request")
        return Detokenized(query.request_id, self.engine.tokenizer.decode(query.tokens))

    def abort(self, request_id: str) -> None:
        event = self.engine.abort(request_id)
        if event is not None:
            self.outbox.put(event)

    def report_load(self) -> None:
        load = (self.engine.num_running, int(getattr(self.engine, "num_waiting", 0)))
        if load != self._load:
            self._load = load
            self.outbox.put(EngineLoad(*load))

    def report_costs(self) -> None:
        """The live cost model and the candidate budget it gives at the load rounds are priced at now (the
        scheduler's recent peak), unless reported less than COSTS_REPORT_SECONDS ago."""
        tuning = self.engine.tuning
        if tuning is None or time.monotonic() - self._costs_reported < COSTS_REPORT_SECONDS:
            return
        from engine.tuning import budget_at  # torch: the server imports this module, never torch

        self._costs_reported = time.monotonic()
        batching = self.engine.scheduler.config.batching  # off: every sequence runs its own rounds
        live, batch = tuning.costs, self.engine.scheduler.peak_load() if batching else 1
        budget = budget_at(live.current, batch, tuning.acceptance, self.engine.default_spec.bounds[1])
        self.outbox.put(EngineCosts(live.current.to_dict(), live.draft_scale, live.target_scale, budget))

    def report_calibration(self, finished: bool) -> None:
        """Report the calibrators when they saw new labels: at most every CALIBRATION_REPORT_SECONDS, and
        whenever a request finishes (before its final event, so its labels are in the metrics by its end)."""
        calibration = self.engine.calibration
        labels, now = calibration.labels_seen, time.monotonic()
        last_labels, last_time = self._calibration_reported
        if labels == last_labels or not (finished or now - last_time >= CALIBRATION_REPORT_SECONDS):
            return
        self._calibration_reported = (labels, now)
        self.outbox.put(CalibrationReport(calibration.snapshots()))


def _parent_alive() -> bool:
    parent = mp.parent_process()
    return parent is None or parent.is_alive()
