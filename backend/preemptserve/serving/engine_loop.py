"""The serving loop: one thread owns the engine; others submit, cancel and get callbacks.

Two threads, as in Triton's vLLM backend: the engine thread only steps the engine, and a
sender thread runs the callbacks (sending a Triton response is an IPC round trip; done
on the engine thread, 32 of them per step cost the engine a fifth of its rate).
Callbacks of one request run in order. Every submitted request gets exactly one output
with ``finished=True`` (a result, a cancellation, or an error), whatever happens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ..core.request import SamplingParams
from ..engine.llm_engine import EngineStats, LLMEngine, RequestOutput

logger = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput, str | None], None]  # (output, error message)


@dataclass
class _Submission:
    request_id: str
    prompt: str
    sampling: SamplingParams
    on_output: OutputCallback
    is_cancelled: Callable[[], bool] | None


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        *,
        cancellation_check_period_s: float = 0.05,
        on_stats: Callable[[EngineStats], None] | None = None,
        stats_period_s: float = 0.1,
    ) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._active: dict[str, _Submission] = {}
        self._cancel_period_s = cancellation_check_period_s
        self._on_stats = on_stats
        self._stats_period_s = stats_period_s
        self._outbox: queue.SimpleQueue[tuple[_Submission, RequestOutput, str | None] | None]
        self._outbox = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._sender = threading.Thread(target=self._send, name="response-sender", daemon=True)

    def start(self) -> None:
        self._sender.start()
        self._thread.start()

    def submit(
        self,
        prompt: str,
        sampling: SamplingParams,
        on_output: OutputCallback,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> str:
        """Queue a request; returns its internal id. Never raises for bad input."""
        request_id = uuid.uuid4().hex
        self._inbox.put(("submit", _Submission(request_id, prompt, sampling, on_output,
                                               is_cancelled)))
        return request_id

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the loop; requests still in flight end with an error."""
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout_s)
        self._outbox.put(None)
        self._sender.join(timeout_s)

    # -- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        last_cancel_check = last_stats = time.monotonic()
        stats_dirty = True
        while not self._stop.is_set():
            self._drain_inbox(block=not self.engine.has_unfinished_requests())
            now = time.monotonic()
            if now - last_cancel_check >= self._cancel_period_s:
                self._check_cancelled()
                last_cancel_check = now
            if self.engine.has_unfinished_requests():
                stats_dirty = True
                try:
                    outputs = self.engine.step()
                except Exception:  # a broken step must not strand requests
                    logger.exception("engine step failed; failing in-flight requests")
                    self._fail_all("internal error in the engine step")
                    continue
                for output in outputs:
                    self._deliver(output)
            # Publish at most every stats period while busy, and once more on going idle.
            idle = not self.engine.has_unfinished_requests()
            due = idle or now - last_stats >= self._stats_period_s
            if self._on_stats and stats_dirty and due:
                self._on_stats(self.engine.get_stats())
                last_stats, stats_dirty = now, not idle
        self._fail_all("the model is shutting down")

    def _drain_inbox(self, block: bool) -> None:
        try:
            kind, item = self._inbox.get(timeout=self._cancel_period_s) if block \
                else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if kind == "submit":
                self._admit(item)  # type: ignore[arg-type]
            elif kind == "cancel":
                self._abort(item)  # type: ignore[arg-type]
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, sub: _Submission) -> None:
        try:
            self.engine.add_request(sub.request_id, sub.prompt, sub.sampling)
        except ValueError as exc:
            self._call(sub, _final(sub.request_id, "error"), str(exc))
            return
        self._active[sub.request_id] = sub

    def _abort(self, request_id: str) -> None:
        sub = self._active.pop(request_id, None)
        output = self.engine.abort_request(request_id)
        if sub is not None and output is not None:
            self._call(sub, output, None)

    def _check_cancelled(self) -> None:
        for request_id, sub in list(self._active.items()):
            if sub.is_cancelled is not None and sub.is_cancelled():
                self._abort(request_id)

    def _deliver(self, output: RequestOutput) -> None:
        sub = self._active.get(output.request_id)
        if sub is None:
            return
        if output.finished:
            del self._active[output.request_id]
        self._call(sub, output, None)

    def _fail_all(self, message: str) -> None:
        for request_id, sub in list(self._active.items()):
            self.engine.abort_request(request_id)
            del self._active[request_id]
            self._call(sub, _final(request_id, "error"), message)

    def _call(self, sub: _Submission, output: RequestOutput, error: str | None) -> None:
        self._outbox.put((sub, output, error))

    # -- the sender thread -----------------------------------------------------------------

    def _send(self) -> None:
        while (item := self._outbox.get()) is not None:
            sub, output, error = item
            try:
                sub.on_output(output, error)
            except Exception:
                logger.exception("response callback failed for request %s", sub.request_id)
                if not output.finished:  # nobody can receive the rest: stop generating
                    self.cancel(sub.request_id)


def _final(request_id: str, reason: str) -> RequestOutput:
    return RequestOutput(request_id=request_id, text="", token_ids=[], finished=True,
                         finish_reason=reason)
