"""The server's side of the engine queue: spawn, supervise and talk to the engine process.

One supervisor thread owns the process: it spawns it (spawn start method, plain config
dict), waits for it to exit and, unless the server is stopping, fails the requests in
flight and spawns a fresh one. One reader thread per engine generation moves messages
from the engine's outbox onto the event loop, where all bookkeeping happens (so the
in-flight tables need no locks). The messages are the dataclasses of engine/events.py,
from the queue to the route unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.events import (
    AbortRequest,
    AddRequest,
    Admitted,
    CalibrationReport,
    Detokenized,
    DetokenizeRequest,
    EngineCosts,
    EngineFailed,
    EngineLoad,
    EngineReady,
    FromEngine,
    RequestRejected,
    Shutdown,
    TokenEvent,
    Tokenized,
    TokenizeRequest,
)
from engine.worker import run_worker
from server.errors import APIError
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

READY, STARTING, RESTARTING, STOPPING, FAILED = "ready", "starting", "restarting", "stopping", "failed"
RETRY_AFTER_SECONDS = 1


@dataclass
class Cancelled:
    """Put on a handle's queue by `abort`, to wake a route waiting on it."""

    request_id: str


HandleMessage = Admitted | RequestRejected | TokenEvent | Tokenized | Detokenized | Cancelled


class RequestHandle:
    """What a route holds for one request: its message queue on the event loop."""

    def __init__(self, client: EngineClient, request_id: str) -> None:
        self.client = client
        self.request_id = request_id
        self.queue: asyncio.Queue[HandleMessage] = asyncio.Queue()
        self.finished = False

    async def admitted(self) -> Admitted:
        """Wait until the engine accepted the request (its prompt length and spec), or raise an APIError."""
        message = await self.queue.get()
        if isinstance(message, Admitted):
            return message
        raise self._error(message)

    async def answer(self) -> Tokenized | Detokenized:
        """The engine's answer to a tokenizer query, or raise an APIError."""
        message = await self.queue.get()
        if isinstance(message, (Tokenized, Detokenized)):
            return message
        raise self._error(message)

    async def next_event(self) -> TokenEvent:
        """The next TokenEvent; a rejection or the engine's loss raises an APIError."""
        message = await self.queue.get()
        if isinstance(message, TokenEvent):
            self.finished = message.finished
            return message
        raise self._error(message)

    async def events(self) -> AsyncIterator[TokenEvent]:
        """TokenEvents up to and including the final one."""
        while not self.finished:
            yield await self.next_event()

    def abort(self) -> None:
        """Cancel in the engine (frees its caches) and wake any waiter; safe to call twice or after the end."""
        if not self.finished:
            self.finished = True
            self.client.abort(self.request_id)
            self.queue.put_nowait(Cancelled(self.request_id))

    def _error(self, message: HandleMessage) -> APIError:
        if isinstance(message, Cancelled):
            return APIError(499, "client closed the request", None, "client_closed_request")
        self.finished = True
        return _rejection_error(message)


def engine_unavailable(message: str) -> APIError:
    """A 503 the client may retry: the engine is starting, restarting or gone."""
    return APIError(503, message, None, "engine_unavailable", {"Retry-After": str(RETRY_AFTER_SECONDS)})


def _rejection_error(rejected: RequestRejected) -> APIError:
    if rejected.code == "engine_unavailable":
        return engine_unavailable(rejected.message)
    status = 500 if rejected.code == "internal_error" else 400
    return APIError(status, rejected.message, rejected.param, rejected.code or "invalid_request")


class EngineClient:
    def __init__(
        self,
        engine_config: dict,
        metrics: ServerMetrics,
        max_queue: int | None = None,
        log_level: str = "INFO",
        max_backoff: float = 30.0,
    ) -> None:
        self.engine_config = engine_config
        self.metrics = metrics
        self.max_queue = max_queue
        self.log_level = log_level
        self.max_backoff = max_backoff
        self.state = STARTING
        self.info: EngineReady | None = None  # from the engine's last start
        self.last_error: str | None = None
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0
        self._ready_generation = 0
        self._inbox: Any = None
        self._process: Any = None
        self._stopping = False
        self._handles: dict[str, RequestHandle] = {}  # requests with a listener
        self._in_flight: set[str] = set()  # requests the engine has not finished
        self._pending: set[str] = set()  # sent to the engine, not yet admitted
        self._queries: set[str] = set()  # tokenizer queries awaiting the engine's answer
        self._engine_waiting = 0  # the engine's own queue (a scheduler may hold requests back)
        self._state_changed = asyncio.Event()
        self._supervisor: threading.Thread | None = None

    # ----- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._supervisor = threading.Thread(target=self._supervise, name="engine-supervisor", daemon=True)
        self._supervisor.start()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """True once ready; False if the first start failed or the timeout passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state not in (READY, FAILED):
            self._state_changed.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._state_changed.wait(), remaining)
            except TimeoutError:
                return False
        return self.state == READY

    async def shutdown(self, grace_seconds: float = 30.0) -> None:
        """Stop taking requests, let running ones finish for `grace_seconds`, cancel the rest, stop the engine."""
        if self.state == STOPPING:
            return
        self._set_state(STOPPING)
        deadline = time.monotonic() + grace_seconds
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping = True
        process, inbox = self._process, self._inbox
        if process is not None and process.is_alive():
            inbox.put(Shutdown())  # the worker aborts what is left (events come back) and exits
            await asyncio.to_thread(process.join, 10.0)
            if process.is_alive():
                log.warning("engine did not stop in time; terminating it")
                process.terminate()
                await asyncio.to_thread(process.join, 5.0)
        await asyncio.sleep(0.1)  # let the last events through the reader
        self._fail_all(self._generation, "the server is shutting down")
        if self._supervisor is not None:
            await asyncio.to_thread(self._supervisor.join, 5.0)

    # ----- requests (event loop thread) -----------------------------------------------
    def unavailable(self) -> APIError:
        """The 503 for a request that arrives while the engine is not ready."""
        return engine_unavailable(f"the engine is {self.state}; retry shortly")

    def check_ready(self) -> None:
        if self.state != READY:
            raise self.unavailable()

    def submit(self, request: AddRequest) -> list[RequestHandle]:
        """Send a validated request to the engine (the route checked readiness): one handle per choice, each
        counting against the queue; 429 when the queue cannot take them all."""
        ids = request.choice_ids
        if self.max_queue is not None and len(self._in_flight) + len(ids) > self.max_queue:
            self.metrics.requests.labels(status="rejected").inc()
            raise APIError(
                429, f"the server is at capacity ({self.max_queue} requests waiting or running); retry shortly",
                None, "queue_full", {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        handles = []
        for request_id in ids:
            handles.append(RequestHandle(self, request_id))
            self._handles[request_id] = handles[-1]
            self._in_flight.add(request_id)
            self._pending.add(request_id)
        self._update_queue_gauge()
        self._inbox.put(request)
        return handles

    async def query(self, message: TokenizeRequest | DetokenizeRequest) -> Tokenized | Detokenized:
        """Ask the engine's tokenizer (answered between two steps); not counted against --max-queue."""
        self.check_ready()
        handle = RequestHandle(self, message.request_id)
        self._handles[message.request_id] = handle
        self._queries.add(message.request_id)
        self._inbox.put(message)
        return await handle.answer()

    def abort(self, request_id: str) -> None:
        self._handles.pop(request_id, None)
        if request_id in self._in_flight and self._inbox is not None:
            self._inbox.put(AbortRequest(request_id))

    # ----- supervisor thread ----------------------------------------------------------
    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            generation = self._generation + 1
            inbox, outbox = self._ctx.Queue(), self._ctx.Queue()
            process = self._ctx.Process(
                target=run_worker,
                args=(self.engine_config, inbox, outbox, self.log_level),
                name="specdecpp-engine",
                daemon=True,
            )
            process.start()
            self._inbox, self._process, self._generation = inbox, process, generation
            log.info("engine process %d started (generation %d)", process.pid, generation)
            reader = threading.Thread(
                target=self._read, args=(generation, outbox, process), name=f"engine-reader-{generation}", daemon=True
            )
            reader.start()
            process.join()
            reader.join(timeout=2.0)
            inbox.cancel_join_thread()  # nobody reads it any more; never block exit on it
            if self._stopping:
                break
            was_ready = self._ready_generation == generation
            if generation == 1 and not was_ready:
                self._call(self._first_start_failed, process.exitcode)
                return
            log.error("engine process %d exited (code %s); restarting", process.pid, process.exitcode)
            self.restarts += 1
            if self.state != STOPPING:
                self.state = RESTARTING  # at once, so no request slips in before the loop hears of it
            self._call(self._engine_lost, generation)
            if was_ready:
                backoff = 1.0
            else:
                time.sleep(backoff)  # a restart that failed to load: back off before the next try
                backoff = min(backoff * 2, self.max_backoff)

    def _read(self, generation: int, outbox: Any, process: Any) -> None:
        while True:
            try:
                message = outbox.get(timeout=0.5)
            except queue.Empty:
                if not process.is_alive():
                    return
                continue
            except (EOFError, OSError):
                return
            self._call(self._on_message, generation, message)

    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed meanwhile
            pass

    # ----- bookkeeping (event loop thread) --------------------------------------------
    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("engine state: %s -> %s", self.state, state)
        self.state = state
        self._state_changed.set()

    def _on_message(self, generation: int, message: FromEngine) -> None:
        if generation != self._generation:
            return  # a late message from an engine that is gone
        if isinstance(message, EngineReady):
            self.info = message
            self._ready_generation = generation
            if message.costs is not None:
                self.metrics.set_costs(message.costs)
            if self.state != STOPPING:
                self._set_state(READY)
        elif isinstance(message, EngineFailed):
            self.last_error = message.message
            log.error("engine failed to start: %s", self.last_error)
        elif isinstance(message, EngineLoad):
            self.metrics.running_requests.set(message.running)
            self._engine_waiting = message.waiting
            self._update_queue_gauge()
        elif isinstance(message, EngineCosts):
            self.metrics.set_costs(message.costs, message.draft_scale, message.target_scale, message.candidate_budget)
        elif isinstance(message, CalibrationReport):
            self.metrics.observe_calibration(message)
        elif isinstance(message, Admitted):
            self._pending.discard(message.request_id)
            self._update_queue_gauge()
            self._deliver(message, last=False)
        elif isinstance(message, (Tokenized, Detokenized, RequestRejected)) and message.request_id in self._queries:
            self._queries.discard(message.request_id)
            self._deliver(message, last=True)
        elif isinstance(message, RequestRejected):
            self._finish(message.request_id)
            self.metrics.requests.labels(status="error" if message.code == "internal_error" else "rejected").inc()
            self._deliver(message, last=True)
        elif isinstance(message, TokenEvent):
            if message.finished:
                self._finish(message.request_id)
                self.metrics.observe_request(message.stats, message.finish_reason or "error")
            self._deliver(message, last=message.finished)

    def _deliver(self, message: HandleMessage, last: bool) -> None:
        """Hand a request's message to its route, if it still listens; forget the route after the last."""
        handle = self._handles.get(message.request_id)
        if handle is not None:
            handle.queue.put_nowait(message)
            if last:
                self._handles.pop(message.request_id, None)

    def _finish(self, request_id: str) -> None:
        self._in_flight.discard(request_id)
        self._pending.discard(request_id)
        self._update_queue_gauge()

    def _update_queue_gauge(self) -> None:
        self.metrics.queue_depth.set(len(self._pending) + self._engine_waiting)

    def _engine_lost(self, generation: int) -> None:
        self._fail_all(generation, "the engine process died; it is restarting, retry shortly")
        self.metrics.running_requests.set(0)
        self._engine_waiting = 0
        self._update_queue_gauge()
        if self.state not in (READY, STOPPING):
            self._set_state(RESTARTING)

    def _first_start_failed(self, exitcode: int | None) -> None:
        self.last_error = self.last_error or f"the engine process exited with code {exitcode} before it was ready"
        self._set_state(FAILED)

    def _fail_all(self, generation: int, reason: str) -> None:
        for request_id in self._queries:
            handle = self._handles.pop(request_id, None)
            if handle is not None:
                handle.queue.put_nowait(RequestRejected(request_id, reason, None, "engine_unavailable"))
        self._queries.clear()
        for request_id in list(self._in_flight):
            self.metrics.requests.labels(status="error").inc()
            handle = self._handles.pop(request_id, None)
            if handle is not None:
                handle.queue.put_nowait(RequestRejected(request_id, reason, None, "engine_unavailable"))
        self._in_flight.clear()
        self._pending.clear()
        self._update_queue_gauge()
