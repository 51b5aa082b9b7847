"""The engine process: build the engine from a plain config, then serve a message queue.

The server spawns `run_worker` in its own process and talks to it only with plain dicts:

  in:  {"type": "add", "request_id", "prompt", "sampling": SamplingParams dict, "spec": SpecConfig dict | None}
       {"type": "abort", "request_id"}
       {"type": "shutdown"}
  out: {"type": "ready", "model", "max_model_len", "default_spec", "pid"} or {"type": "error", "message"}
       {"type": "added", "request_id", "prompt_tokens"}
       {"type": "request_error", "request_id", "message", "param", "code"}
       {"type": "event", **TokenEvent.to_dict()}  (one per request per step; the last one carries stats)
       {"type": "load", "running", "waiting"}  (whenever the engine's load changes)

The loop blocks on the inbox while idle and otherwise steps the engine, draining whatever
arrived in between, so a new request or an abort waits at most one step.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import traceback
from typing import Any

log = logging.getLogger(__name__)
IDLE_POLL_SECONDS = 1.0  # how often an idle worker checks that its parent is still alive


def run_worker(config: dict, inbox: Any, outbox: Any, log_level: str = "INFO") -> None:
    """Process entry point (must stay importable for the spawn start method)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s engine[%(process)d]: %(message)s")
    try:
        engine, info = _build(config)
    except Exception as exc:  # report why, then exit: the server decides whether to retry
        log.error("engine failed to start: %s", exc)
        outbox.put({"type": "error", "message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        return
    outbox.put({"type": "ready", "pid": os.getpid(), **info})
    EngineLoop(engine, inbox, outbox).run()


def _build(config: dict) -> tuple[Any, dict]:
    from engine.config import EngineConfig
    from engine.factory import build_engine, resolve_paths
    from engine.loading.loader import model_identity

    engine_config = EngineConfig.from_dict(config)
    engine = build_engine(engine_config)
    target, draft, head = resolve_paths(engine_config)
    info = {
        "model": model_identity(target),
        "draft": model_identity(draft) if draft else None,
        "head": head,
        "heads": {name: {"timing": h.timing} for name, h in engine.heads.items()},
        "max_model_len": engine.max_model_len,
        "default_spec": engine.default_spec.model_dump(),
        "scheduler": dataclasses.asdict(engine.scheduler.config),  # batching, max_num_seqs, ...
    }
    return engine, info


class EngineLoop:
    """Drain messages, step, push events; one instance per engine process."""

    def __init__(self, engine: Any, inbox: Any, outbox: Any) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.stopping = False
        self._load: tuple[int, int] = (0, 0)

    def run(self) -> None:
        while not self.stopping:
            self.drain(block=not self.engine.has_unfinished())
            if self.stopping:
                break
            if self.engine.has_unfinished():
                for event in self.engine.step():
                    self.outbox.put({"type": "event", **event.to_dict()})
            self.report_load()
        for request_id in list(self.engine.running):  # shutdown: cancel what is left, cleanly
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

    def handle(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "add":
            self.add(message)
        elif kind == "abort":
            self.abort(message["request_id"])
        elif kind == "shutdown":
            self.stopping = True
        else:
            log.warning("ignoring unknown message type %r", kind)

    def add(self, message: dict) -> None:
        from engine.llm_engine import RequestError
        from engine.params import SamplingParams, SpecConfig

        request_id = message["request_id"]
        try:
            sampling = SamplingParams.model_validate(message["sampling"])
            spec = SpecConfig.model_validate(message["spec"]) if message.get("spec") else None
            prompt_tokens = self.engine.add_request(request_id, message["prompt"], sampling, spec)
        except RequestError as exc:
            self.outbox.put(_request_error(request_id, str(exc), exc.param, exc.code))
            return
        except ValueError as exc:  # includes pydantic validation errors: a bad request, not a bad engine
            self.outbox.put(_request_error(request_id, str(exc), None, "invalid_request"))
            return
        except Exception as exc:
            log.exception("add_request failed for %s", request_id)
            self.outbox.put(_request_error(request_id, f"{type(exc).__name__}: {exc}", None, "internal_error"))
            return
        self.outbox.put({"type": "added", "request_id": request_id, "prompt_tokens": prompt_tokens})

    def abort(self, request_id: str) -> None:
        event = self.engine.abort(request_id)
        if event is not None:
            self.outbox.put({"type": "event", **event.to_dict()})

    def report_load(self) -> None:
        load = (self.engine.num_running, int(getattr(self.engine, "num_waiting", 0)))
        if load != self._load:
            self._load = load
            self.outbox.put({"type": "load", "running": load[0], "waiting": load[1]})


def _request_error(request_id: str, message: str, param: str | None, code: str | None) -> dict:
    return {"type": "request_error", "request_id": request_id, "message": message, "param": param, "code": code}


def _parent_alive() -> bool:
    parent = mp.parent_process()
    return parent is None or parent.is_alive()
