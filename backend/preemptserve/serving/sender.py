"""The response sender thread, shared by the serving loop and the cluster frontend.

Sending a Triton response and asking a client's ``is_cancelled()`` are IPC round trips to
the server process: one thread does both, off the engine and poll threads. It runs each
request's callback in the order the outputs were queued (so in order per request) and,
every ``period_s``, asks the clients of the requests its owner lists whether they
cancelled. Its owner supplies three things: which requests to poll, what to do as a
request's final output goes (forget it), and how to cancel one.

Other calls into the server from the model (its metrics, its health) can run here too
(``call``), so that one thread alone talks to Triton besides ``execute``: the Python
backend's stub once crashed (SIGSEGV in its shared-memory allocator) while a metric was
updated from another thread as this one sent responses.

A request is anything with ``request_id``, ``on_output(output, error)``,
``is_cancelled`` (a callable or None) and a ``polling`` flag (still asked), which the
sender clears when asking fails, when the client cancelled, or when the callback failed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..engine.outputs import RequestOutput

logger = logging.getLogger(__name__)


class ResponseSender:
    def __init__(self, period_s: float, pollable: Callable[[], Iterable[Any]],
                 on_final: Callable[[str], None], cancel: Callable[[str], None]) -> None:
        self._period_s = period_s
        self._pollable = pollable
        self._on_final = on_final
        self._cancel = cancel
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="response-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, request: Any, output: RequestOutput, error: str | None) -> None:
        """Queue one output (``error``: its error message) for ``request``'s callback."""
        self._queue.put((request, output, error))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the sender thread, in turn with the responses."""
        self._queue.put((fn,))

    def stop(self, timeout_s: float) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        next_check = time.monotonic() + self._period_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_check - time.monotonic()))
            except queue.Empty:
                item = ()
            if item is None:
                return
            if len(item) == 1:
                try:
                    item[0]()
                except Exception:
                    logger.exception("a call on the response sender thread failed")
            elif item:
                self._send(*item)
            if time.monotonic() >= next_check:
                self._check_cancelled()
                next_check = time.monotonic() + self._period_s

    def _send(self, request: Any, output: RequestOutput, error: str | None) -> None:
        if output.finished:  # the last thing that happens to it
            self._on_final(request.request_id)
        try:
            request.on_output(output, error)
        except Exception:
            logger.exception("response callback failed for request %s", request.request_id)
            if not output.finished:  # nobody can receive the rest: stop generating
                request.polling = False
                self._cancel(request.request_id)

    def _check_cancelled(self) -> None:
        for request in self._pollable():
            try:
                cancelled = request.is_cancelled()
            except Exception:
                logger.exception("is_cancelled() failed for request %s; no longer polled",
                                 request.request_id)
                request.polling = False
                continue
            if cancelled:
                request.polling = False
                self._cancel(request.request_id)
