"""The serving loop: one thread owns the engine; others submit, cancel and get callbacks.

Two threads, as in Triton's vLLM backend: the engine thread only steps the engine, and a
sender thread runs the callbacks and polls cancellation (sending a Triton response and
asking ``is_cancelled()`` are IPC round trips to the server process: they stay off the
engine thread). Callbacks of one request run in order. Every submitted request gets
exactly one output with ``finished=True`` (a result, a cancellation, or an error),
whatever happens.

One table holds every request from ``submit`` until its final output is sent, under one
lock, with the request's stage: ``SUBMITTED`` (in the inbox), ``IN_ENGINE`` (added to the
engine: its outputs go to the sender), ``ENDED`` (its final output is queued for the
sender; the sender removes it from the table as it sends that output). Only the engine
thread moves a request forward (``submit`` aside), so it alone decides which output is the
final one; the sender polls ``is_cancelled()`` of the requests not ``ENDED`` and removes
sent ones. A cancel for a request that is not in the engine (never admitted, or already
ended or sent) does nothing.

When the engine reports a failure it cannot recover from (a tensor-parallel rank died),
the loop fails every request in flight, rejects every later one with the reason, and
calls ``on_failure`` once: the model is unhealthy from then on.

Overload protection (``max_queue_size``, TensorRT-LLM's name): at most that many requests
may wait, where waiting means accepted and never scheduled (``Request.first_scheduled_time_s
is None``): submissions still in the inbox plus the engine's never-scheduled requests.
Requests preempted after they started do not count: they were served already and the
policy, not the queue, decides when they resume. ``submit`` refuses a request beyond the
limit at once, in the caller's thread, with ``QueueFullError``: it never reaches the
inbox, the engine thread or the scheduler. The counts live under the table's lock:
submitters add to the inbox share, the engine thread moves requests from the inbox to the
engine and publishes the engine's count after every admission and every iteration.
Between two publications the engine thread only schedules or removes requests, so the
published count is never below the true one and the limit holds at every instant.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ..config import ServingConfig
from ..core.request import SamplingParams
from ..engine.iteration_stats import IterationLog
from ..engine.llm_engine import LLMEngine
from ..engine.outputs import EngineStats, RequestOutput
from .sender import ResponseSender

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """``submit`` refused a request: ``max_queue_size`` requests are waiting already."""

    def __init__(self, max_queue_size: int) -> None:
        super().__init__(f"request rejected: the queue is full (max_queue_size="
                         f"{max_queue_size}); retry later")
        self.max_queue_size = max_queue_size


OutputCallback = Callable[[RequestOutput, str | None], None]  # (output, error message)


class _Stage(enum.Enum):
    SUBMITTED = "submitted"  # in the inbox
    IN_ENGINE = "in_engine"  # added to the engine; its outputs go to the sender
    ENDED = "ended"  # final output queued for the sender; removed from the table once sent


@dataclass(eq=False)
class _Submission:
    request_id: str
    prompt: str | list[int]
    sampling: SamplingParams
    on_output: OutputCallback
    is_cancelled: Callable[[], bool] | None
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    echo_prompt: bool = False
    stream: bool = True
    priority: str = "normal"
    return_perf_metrics: bool = False
    fork_of: str | None = None
    stage: _Stage = _Stage.SUBMITTED  # under EngineLoop._lock
    polling: bool = False  # sender thread only: is_cancelled() is still asked

    def __post_init__(self) -> None:
        self.polling = self.is_cancelled is not None


_Send = tuple[_Submission, RequestOutput, str | None]


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        *,
        cancellation_check_period_s: float = 0.05,
        on_stats: Callable[[EngineStats], None] | None = None,
        stats_period_s: float = 0.1,
        on_failure: Callable[[str], None] | None = None,
        iteration_stats_path: str | None = None,
        max_queue_size: int = 0,
    ) -> None:
        """``iteration_stats_path``: append one JSON line per engine iteration there
        (``engine/iteration_stats.py``). ``max_queue_size``: most requests waiting (never
        scheduled) before ``submit`` refuses new ones; 0: unbounded."""
        if max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0 (0: unbounded), got {max_queue_size}")
        self.engine = engine
        self._iteration_log = IterationLog(iteration_stats_path) if iteration_stats_path else None
        engine.record_iteration_stats = self._iteration_log is not None
        self._on_failure = on_failure
        self._failure: str | None = None
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._on_stats = on_stats
        self._stats_period_s = stats_period_s
        self._sender = ResponseSender(cancellation_check_period_s, self._pollable,
                                      self._forget, self.cancel)
        # Under the lock: every request from submit until its final output is sent, the
        # admission counts (submissions in the inbox, and the engine's never-scheduled
        # requests as the engine thread last published them), and whether the engine
        # thread has stopped taking submissions.
        self._lock = threading.Lock()
        self._requests: dict[str, _Submission] = {}
        self._max_queue_size = max_queue_size
        self._num_in_inbox = 0
        self._num_queued_in_engine = 0
        self._num_rejected = 0
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    @classmethod
    def for_model(cls, engine: LLMEngine, config: ServingConfig,
                  on_stats: Callable[[EngineStats], None],
                  on_failure: Callable[[str], None]) -> EngineLoop:
        """The loop of a Triton model, with the model's settings. ``on_stats`` and
        ``on_failure`` call into the server (metrics, health): they run on the thread that
        sends the responses, the engine thread only hands them over."""
        loop: EngineLoop = cls(
            engine,
            cancellation_check_period_s=config.cancellation_check_period_ms / 1000,
            on_stats=lambda stats: loop.call_on_sender(lambda: on_stats(stats)),
            on_failure=lambda reason: loop.call_on_sender(lambda: on_failure(reason)),
            iteration_stats_path=config.iteration_stats_path or None,
            max_queue_size=config.max_queue_size,
        )
        return loop

    def start(self) -> None:
        self._sender.start()
        self._thread.start()

    def submit(
        self,
        prompt: str | list[int],
        sampling: SamplingParams,
        on_output: OutputCallback,
        is_cancelled: Callable[[], bool] | None = None,
        *,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
        echo_prompt: bool = False,
        stream: bool = True,
        request_id: str | None = None,
        priority: str = "normal",
        return_perf_metrics: bool = False,
        fork_of: str | None = None,
    ) -> str:
        """Queue a request (text, or token ids); returns its id (``request_id``, or a new
        one). Never raises for bad input.

        ``echo_prompt`` and ``stream`` shape the outputs' text (``LLMEngine.add_request``);
        ``priority`` is "high" or "normal"; ``return_perf_metrics``: outputs carry timings
        and block counts; ``fork_of``: a request of the same prompt submitted just before,
        whose prefill and KV blocks this one shares (``LLMEngine.add_request``).

        Raises ``QueueFullError`` (nothing else happens: no callback, no trace of the
        request) when ``max_queue_size`` requests are waiting. After shutdown the request
        ends with an error at once (its callback runs if the sender still does).
        """
        request_id = request_id or uuid.uuid4().hex
        sub = _Submission(request_id, prompt, sampling, on_output, is_cancelled,
                          ttft_slo_s, tbt_slo_s, echo_prompt, stream, priority,
                          return_perf_metrics, fork_of)
        with self._lock:
            if self._closed:  # ended at once, never in the table: nothing to poll or leak
                sub.stage = _Stage.ENDED
                self._sender.put(sub, _final(request_id, "error"), self._closed_reason())
                return request_id
            if (self._max_queue_size
                    and self._num_in_inbox + self._num_queued_in_engine >= self._max_queue_size):
                self._num_rejected += 1
                raise QueueFullError(self._max_queue_size)
            self._num_in_inbox += 1
            self._requests[request_id] = sub
            # In the inbox before any cancel for it can be: the sender sees it in the table.
            self._inbox.put(("submit", sub))
        return request_id

    def cancel(self, request_id: str) -> None:
        """End a request with ``finish_reason="abort"``; nothing if it has ended already."""
        self._inbox.put(("cancel", request_id))

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run ``fn(engine)`` on the engine thread between two steps; its result (or
        exception) comes in the future. How another thread touches the engine (a move of
        a request to another engine, ``cluster/instance.py``). Fails at once if the loop
        has stopped."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                future.set_exception(RuntimeError(self._closed_reason()))
                return future
            self._inbox.put(("call", (fn, future)))
        return future

    def call_on_sender(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the thread that sends responses (``serving/sender.py``): how
        the Triton adapter updates its metrics, one thread talking to the server."""
        self._sender.call(fn)

    def track(self, request_id: str, on_output: OutputCallback) -> None:
        """Serve a request put into the engine directly (``import_request``, a request
        moved here): its outputs go to ``on_output`` from now on. Engine thread only."""
        with self._lock:
            self._requests[request_id] = _Submission(request_id, "", SamplingParams(),
                                                     on_output, None, stage=_Stage.IN_ENGINE)

    def untrack(self, request_id: str) -> None:
        """Stop serving a request that left the engine without ending (moved to another
        engine): it gets no final output here. Engine thread only."""
        with self._lock:
            sub = self._requests.get(request_id)
            if sub is not None and sub.stage is _Stage.IN_ENGINE:
                del self._requests[request_id]

    @property
    def num_queued(self) -> int:
        """Requests waiting as the limit counts them (in the inbox, or never scheduled)."""
        with self._lock:
            return self._num_in_inbox + self._num_queued_in_engine

    @property
    def num_in_flight(self) -> int:
        """Requests submitted whose final output has not been sent yet."""
        with self._lock:
            return len(self._requests)

    @property
    def num_rejected_total(self) -> int:
        """Requests ``submit`` refused because the queue was full."""
        return self._num_rejected

    @property
    def failure(self) -> str | None:
        """Why the loop serves no more requests (the engine failed), or ``None``."""
        return self._failure

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the loop and the engine; requests still in flight end with an error."""
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout_s)
        self._sender.stop(timeout_s)
        self.engine.shutdown()

    def _closed_reason(self) -> str:
        if self._failure is not None:
            return f"the model is unhealthy: {self._failure}"
        return "the model is shutting down"

    # -- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # a bug in the loop itself must not strand requests either
            logger.exception("the serving loop failed")
            self._mark_failed("internal error in the serving loop")
        finally:
            with self._lock:  # later submissions end at once; none enters the inbox any more
                self._closed = True
            self._drain_inbox(block=False)  # stopping: these submissions end with an error
            self._fail_all("the model is shutting down")
            if self._iteration_log is not None:
                self._iteration_log.close()

    def _serve(self) -> None:
        last_stats = time.monotonic()
        stats_dirty = True
        while not self._stop.is_set():
            if self._drain_inbox(block=not self.engine.has_unfinished_requests()):
                stats_dirty = True  # a cancel or a call may have freed or taken blocks
            if self._failure is None and self.engine.failure is not None:
                self._mark_failed(self.engine.failure)  # e.g. a rank died while idle
            now = time.monotonic()
            if self.engine.has_unfinished_requests():
                stats_dirty = True
                try:
                    outputs = self.engine.step()
                except Exception:  # a broken step must not strand requests
                    logger.exception("engine step failed; failing in-flight requests")
                    if self.engine.failure is not None:
                        self._mark_failed(self.engine.failure)
                    else:
                        self._fail_all("internal error in the engine step")
                    continue
                self._deliver(outputs)
                if self._iteration_log is not None and self.engine.last_iteration is not None:
                    self._iteration_log.write(self.engine.last_iteration)
            # Publish at most every stats period while busy, and once more on going idle.
            idle = not self.engine.has_unfinished_requests()
            if idle and self._iteration_log is not None:
                # Also when the last request left between steps (moved to another instance).
                self._iteration_log.flush()
            due = idle or now - last_stats >= self._stats_period_s
            if self._on_stats and stats_dirty and due:
                self._on_stats(self.engine.get_stats())
                last_stats, stats_dirty = now, not idle
            self._publish_queued()

    def _drain_inbox(self, block: bool) -> bool:
        """Take in everything waiting in the inbox; False if there was nothing."""
        try:
            kind, item = self._inbox.get(timeout=self._stats_period_s) if block \
                else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            if kind == "submit":
                self._admit(item)  # type: ignore[arg-type]
            elif kind == "cancel":
                self._abort(item)  # type: ignore[arg-type]
            elif kind == "call":
                self._call(*item)  # type: ignore[misc]
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _call(self, fn: Callable[[LLMEngine], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except BaseException as exc:  # the caller's to handle
            future.set_exception(exc)

    def _mark_failed(self, reason: str) -> None:
        logger.error("the engine failed (%s): the model is unhealthy", reason)
        self._failure = reason
        self._fail_all(f"the model is unhealthy: {reason}")
        if self._on_failure is not None:
            try:
                self._on_failure(reason)
            except Exception:
                logger.exception("on_failure callback failed")

    def _publish_queued(self) -> None:
        """Share the engine's never-scheduled count with submitters (engine thread only)."""
        num_queued = self.engine.num_queued_requests()
        with self._lock:
            self._num_queued_in_engine = num_queued

    def _admit(self, sub: _Submission) -> None:
        """Inbox -> engine, or -> ended with an error (engine thread only)."""
        error = None
        if self._failure is not None:
            error = f"the model is unhealthy: {self._failure}"
        elif self._stop.is_set() or self._closed:
            error = "the model is shutting down"
        else:
            try:
                self.engine.add_request(sub.request_id, sub.prompt, sub.sampling,
                                        ttft_slo_s=sub.ttft_slo_s, tbt_slo_s=sub.tbt_slo_s,
                                        echo_prompt=sub.echo_prompt, stream=sub.stream,
                                        priority=sub.priority,
                                        return_perf_metrics=sub.return_perf_metrics,
                                        fork_of=sub.fork_of)
            except ValueError as exc:  # bad input: the message is for the client
                error = str(exc)
            except Exception:
                logger.exception("adding request %s failed", sub.request_id)
                error = "internal error while adding the request"
        num_queued = self.engine.num_queued_requests()
        with self._lock:  # it leaves the inbox's share either way, in one publication
            self._num_in_inbox -= 1
            self._num_queued_in_engine = num_queued
            sub.stage = _Stage.IN_ENGINE if error is None else _Stage.ENDED
        if error is not None:
            self._sender.put(sub, _final(sub.request_id, "error"), error)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            sub = self._requests.get(request_id)
            if sub is None or sub.stage is not _Stage.IN_ENGINE:
                return  # ended already (or sent and gone): its final output is on its way
            sub.stage = _Stage.ENDED
        output = self.engine.abort_request(request_id)
        self._sender.put(sub, output or _final(request_id, "abort"), None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        sends: list[_Send] = []
        with self._lock:
            for output in outputs:
                sub = self._requests.get(output.request_id)
                if sub is None or sub.stage is not _Stage.IN_ENGINE:
                    continue
                if output.finished:
                    sub.stage = _Stage.ENDED
                sends.append((sub, output, None))
        for send in sends:
            self._sender.put(*send)

    def _fail_all(self, message: str) -> None:
        """End every request in the engine with ``message`` (engine thread only)."""
        with self._lock:
            subs = [sub for sub in self._requests.values() if sub.stage is _Stage.IN_ENGINE]
            for sub in subs:
                sub.stage = _Stage.ENDED
        for sub in subs:
            try:
                self.engine.abort_request(sub.request_id)  # its blocks return
            except Exception:
                logger.exception("aborting request %s failed", sub.request_id)
            self._sender.put(sub, _final(sub.request_id, "error"), message)

    # -- for the sender thread -------------------------------------------------------------

    def _forget(self, request_id: str) -> None:
        """Its final output is being sent: it leaves the table."""
        with self._lock:
            self._requests.pop(request_id, None)

    def _pollable(self) -> list[_Submission]:
        with self._lock:
            return [sub for sub in self._requests.values()
                    if sub.polling and sub.stage is not _Stage.ENDED]


def _final(request_id: str, reason: str) -> RequestOutput:
    return RequestOutput(request_id=request_id, text="", token_ids=[], finished=True,
                         finish_reason=reason)
