"""One engine instance of a cluster (Llumnix's *llumlet*): an engine, its serving loop,
its outputs waiting for the frontend, and the moves of its requests to other instances.

``EngineInstance`` is a plain class; ``cluster/ray_cluster.py`` runs it as a Ray actor,
one process per instance, and tests may run it in-process. Its engine is touched only by
its ``EngineLoop``'s thread: everything else (a request added or cancelled, a stage of a
move in either direction) goes through the loop's inbox and runs between two steps.

* **Outputs** wait in a buffer until the frontend's long poll (``poll``) takes them,
  with the instance's newest load report (freeness, ``core/scheduler/load.py``) and
  engine statistics.
* **Moving a request out** (``migrate_out``, the source drives, as in Llumnix): a
  ``StagedMigration`` whose source is this engine (each stage one call on the engine
  thread) and whose destination is another instance's ``stage_in``/``release_reservation``
  reached through ``Peer`` (a Ray actor handle, with a timeout on every call). The
  request's entry leaves this loop's table only once the destination has it.
* **Moving a request in** (``stage_in``): blocks reserved and written, then the request
  imported and served by this loop. A reservation that no call of its source touched for
  ``reservation_timeout_s`` is freed (the source died: Llumnix's
  ``PENDING_MIGRATE_IN_TIMEOUT``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import EngineConfig
from ..core.global_scheduler import WAITING_POLICIES, choose_request, migration_candidates
from ..core.request import SamplingParams
from ..core.scheduler.load import InstanceLoad
from ..engine.llm_engine import LLMEngine
from ..engine.migration import RequestSnapshot, StageOut
from ..engine.outputs import EngineStats, RequestOutput
from ..serving.engine_loop import EngineLoop
from .migration import MigrationConfig, MigrationResult, MigrationStatus, StagedMigration

logger = logging.getLogger(__name__)


@dataclass
class InstanceReport:
    """What one poll returns: outputs since the last poll, and where the instance stands."""

    instance_id: int
    outputs: list[tuple[RequestOutput, str | None]]
    load: InstanceLoad
    stats: EngineStats
    failure: str | None = None
    # Moves out of this instance that ended since: (request id, result).
    migrations: list[tuple[str, MigrationResult]] = field(default_factory=list)


class Peer:
    """Another instance as a migration destination (``cluster/migration.py``'s protocol),
    reached through ``call(method_name, *args)``; any failure of a call is the
    destination's failure (``ABORTED_DST``)."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call

    def transport(self, data: Sequence[torch.Tensor]) -> Sequence[Any]:
        """Block data as ``stage_in`` takes it: numpy arrays (the object store's way);
        ``cluster/gloo_transport.py``'s peer sends the tensors themselves."""
        return _to_numpy(data)

    def stage_in(self, request_id: str, on_host: bool, data: Sequence[Any], num_blocks: int,
                 snapshot: RequestSnapshot | None) -> str:
        try:
            return self._call("stage_in", request_id, on_host, data, num_blocks, snapshot)
        except Exception as exc:
            return f"destination failed: {type(exc).__name__}: {exc}"

    def release_reservation(self, request_id: str) -> None:
        try:
            self._call("release_reservation", request_id)
        except Exception:  # it died: its reservations died with it
            logger.warning("could not release reservation %s on the destination", request_id)

    def abort_request(self, request_id: str) -> None:
        try:
            self._call("abort", request_id)
        except Exception:
            logger.warning("could not abort moved request %s on the destination", request_id)


class EngineInstance:
    def __init__(self, instance_id: int, config: EngineConfig, *,
                 torch_threads: int | None = None, reservation_timeout_s: float = 10.0,
                 stats_period_s: float = 0.05, iteration_stats_path: str | None = None) -> None:
        """``iteration_stats_path``: this instance's iteration log (one JSON line per
        engine iteration, ``engine/iteration_stats.py``); None: none."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.instance_id = instance_id
        self.engine = LLMEngine(config)
        self._cond = threading.Condition()
        self._outputs: list[tuple[RequestOutput, str | None]] = []
        self._migrations: list[tuple[str, MigrationResult]] = []
        self._report = (self.engine.get_stats(), self.engine.load())
        self._reservation_timeout_s = reservation_timeout_s
        self._touched: dict[str, float] = {}  # reservation -> when its source last called
        self.loop = EngineLoop(self.engine, on_stats=self._on_stats,
                               stats_period_s=stats_period_s,
                               iteration_stats_path=iteration_stats_path)
        self.loop.start()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._expire_reservations,
                                          name="reservation-watchdog", daemon=True)
        self._watchdog.start()

    def info(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "pid": os.getpid(),
                "device": str(self.engine.device),
                "num_blocks": self.engine.block_manager.num_blocks,
                "block_size": self.engine.block_manager.block_size,
                "policy": self.engine.scheduler.policy_name}

    def block_usage(self) -> dict[str, int]:
        """Blocks in use now, by tier, and those reserved for moves coming in."""
        def usage(engine: LLMEngine) -> dict[str, int]:
            bm = engine.block_manager
            return {"device": bm.num_used_blocks, "host": bm.num_used_host_blocks,
                    "requests": len(engine.scheduler.requests),
                    "detached": len(engine.scheduler.detached)}

        return self._on_engine(usage)

    # -- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str, sampling: SamplingParams, *,
                    ttft_slo_s: float | None = None, tbt_slo_s: float | None = None,
                    echo_prompt: bool = False, stream: bool = True,
                    priority: str = "normal") -> None:
        """Serve a request; its outputs (an error for bad input) come through ``poll``."""
        self.loop.submit(prompt, sampling, self._collect, request_id=request_id,
                         ttft_slo_s=ttft_slo_s, tbt_slo_s=tbt_slo_s,
                         echo_prompt=echo_prompt, stream=stream, priority=priority)

    def abort(self, request_id: str) -> None:
        self.loop.cancel(request_id)

    def poll(self, max_wait_s: float) -> InstanceReport:
        """Outputs since the last poll (waiting up to ``max_wait_s`` for one)."""
        with self._cond:
            if not self._outputs and not self._migrations:
                self._cond.wait(max_wait_s)
            outputs, self._outputs = self._outputs, []
            migrations, self._migrations = self._migrations, []
            stats, load = self._report
        return InstanceReport(self.instance_id, outputs, load, stats, self.loop.failure,
                              migrations)

    def _collect(self, output: RequestOutput, error: str | None) -> None:
        with self._cond:
            self._outputs.append((output, error))
            self._cond.notify_all()

    def _on_stats(self, stats: EngineStats) -> None:  # the engine thread
        self._report = (stats, self.engine.load())

    def shutdown(self) -> None:
        self._stop.set()
        self.loop.shutdown()

    # -- moving a request out (this instance is the source) ----------------------------------

    def pick_request(self, policy: str = "SR") -> str | None:
        """The request to move out by Llumnix's request policy (SR: shortest running;
        FCW, FCWSR: a request holding no cache first)."""
        def pick(engine: LLMEngine) -> str | None:
            candidates = migration_candidates(engine.scheduler, time.monotonic(),
                                              include_waiting=policy in WAITING_POLICIES)
            chosen = choose_request(candidates, policy)
            return None if chosen is None else chosen.request_id

        return self._on_engine(pick)

    def migrate_out(self, request_id: str, destination: Peer,
                    config: MigrationConfig) -> MigrationResult:
        """Move one request to ``destination`` in stages; returns how it ended."""
        migration = StagedMigration(_LoopSource(self), destination, request_id, config,
                                    transport=destination.transport)
        try:
            while (result := migration.step()) is None:
                pass
        except Exception as exc:  # the source's own side broke (the loop stopped)
            logger.exception("moving %s out failed", request_id)
            destination.release_reservation(request_id)
            try:  # if it was stopped for the last stage, it resumes here (queued after
                # any end_export still pending, so a move that did commit stays committed)
                _LoopSource(self).end_export(request_id, committed=False)
            except Exception:
                logger.exception("could not resume %s after a failed move", request_id)
            result = MigrationResult(MigrationStatus.ABORTED_SRC, f"source failed: {exc}",
                                     migration.num_stages, 0, 0.0)
        with self._cond:
            self._migrations.append((request_id, result))
            self._cond.notify_all()
        return result

    # -- moving a request in (this instance is the destination) ------------------------------

    def stage_in(self, request_id: str, on_host: bool,
                 data: Sequence[np.ndarray | torch.Tensor], num_blocks: int,
                 snapshot: RequestSnapshot | None) -> str:
        tensors = [rank_data if isinstance(rank_data, torch.Tensor) else _from_numpy(rank_data)
                   for rank_data in data]

        def stage(engine: LLMEngine) -> str:
            reason = engine.stage_in(request_id, on_host, tensors, num_blocks, snapshot)
            if not reason and snapshot is not None:
                self.loop.track(request_id, self._collect)  # before its first step here
            return reason

        self._touched[request_id] = time.monotonic()
        reason = self._on_engine(stage)
        if snapshot is not None and not reason:
            self._touched.pop(request_id, None)
        return reason

    def release_reservation(self, request_id: str) -> None:
        self._touched.pop(request_id, None)
        self._on_engine(lambda engine: engine.release_reservation(request_id))

    def _expire_reservations(self) -> None:
        period = min(1.0, self._reservation_timeout_s / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            for request_id, touched in list(self._touched.items()):
                if now - touched > self._reservation_timeout_s:
                    logger.warning("instance %d: freeing the reservation of %s: its source "
                                   "went silent", self.instance_id, request_id)
                    try:
                        self.release_reservation(request_id)
                    except Exception:
                        logger.exception("freeing reservation %s failed", request_id)

    def _on_engine(self, fn: Callable[[LLMEngine], Any]) -> Any:
        return self.loop.call(fn).result(timeout=self._reservation_timeout_s)


class _LoopSource:
    """This instance's engine as a migration source, each call on its engine thread."""

    def __init__(self, instance: EngineInstance) -> None:
        self._instance = instance

    def stage_out(self, request_id: str, sent: tuple[int, ...], sent_on_host: bool,
                  num_preemptions: int | None, last_stage_max_blocks: int) -> StageOut:
        """The check (and the stop) on the engine thread; the copy out of the cache on
        this thread where the engine allows it, so the source's steps go on meanwhile."""
        engine = self._instance.engine
        read_here = engine.concurrent_reads
        out = self._instance._on_engine(lambda engine: engine.stage_out(
            request_id, sent, sent_on_host, num_preemptions, last_stage_max_blocks,
            read=not read_here))
        if read_here and out.block_ids and not out.reason:
            out.data = engine.read_blocks(out.block_ids, out.on_host)
        return out

    def end_export(self, request_id: str, committed: bool) -> bool:
        def end(engine: LLMEngine) -> bool:
            ended = engine.end_export(request_id, committed)
            if ended and committed:  # served by the destination from now on
                self._instance.loop.untrack(request_id)
            return ended

        return self._instance._on_engine(end)


def _to_numpy(data: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Block data as numpy arrays: Ray's object store carries those without pickling.
    numpy has no bfloat16: such blocks travel as their bits (``_from_numpy`` undoes it)."""
    return [(tensor.view(torch.int16).numpy().view(_BF16_BITS) if tensor.dtype is torch.bfloat16
             else tensor.numpy()) for tensor in data]


# bfloat16 bits in transit: a numpy dtype of their own, so they cannot pass for int16.
_BF16_BITS = np.dtype([("bfloat16", "<i2")])


def _from_numpy(data: np.ndarray) -> torch.Tensor:
    if data.dtype == _BF16_BITS:
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)
