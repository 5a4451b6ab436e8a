"""Live migration of one running request between two engines, in stages (Llumnix).

The KV cache is append-only: every block but the one still being written can be copied
while the request keeps decoding on the source. So a move is a few *stages*, each run
between two steps of the source engine (``StagedMigration.step``):

* **a stage** copies the blocks added since the previous one, all but the last (still
  filling), into blocks reserved on the destination; the request keeps running;
* **the last stage**, once at most ``last_stage_max_blocks`` remain (or the request's
  cache is on the host tier, where it is not running anyway): the source stops the
  request (``export_request``), the rest is reserved and copied, the destination
  ``import_request``s it, and the source frees it (``finish_export``): it continues on
  the destination with exactly the tokens it would have produced.

Abort paths, as Llumnix's code runs them (``../shared/design/llumnix.md`` section 1.5):
the request finished or was preempted since the previous stage, or more than
``max_stages`` stages were needed: ``ABORTED_SRC`` (the destination's reservation is
released); the destination has no room at some stage, or refuses the request at commit:
``ABORTED_DST`` (released too; after the last stage began, the request resumes on the
source where it stopped). Either way both engines keep every block accounted for.

The two sides are endpoints (``MigrationSource``, ``MigrationDestination``), each stage
one call per side: an ``LLMEngine`` is both (two engines in one process, driven from one
thread, the transport a function call); a cluster instance wraps them so that each call
runs on its engine's thread between two steps, the destination in another process
(``cluster/instance.py``); the cluster simulator's endpoints are a scheduler and block
manager with no data (``sim/cluster.py``), which runs each stage's two halves
(``begin_stage``, ``end_stage``) at different virtual times, the copy between them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: the simulator runs this without torch
    from ..engine.migration import RequestSnapshot, StageOut

# Block data of every rank (``StageOut.data``) from source to destination; in one
# process, the identity.
Transport = Callable[[Sequence[Any]], Sequence[Any]]


class MigrationSource(Protocol):
    def stage_out(self, request_id: str, sent: tuple[int, ...], sent_on_host: bool,
                  num_preemptions: int | None, last_stage_max_blocks: int) -> StageOut: ...

    def end_export(self, request_id: str, committed: bool) -> bool: ...


class MigrationDestination(Protocol):
    def stage_in(self, request_id: str, on_host: bool, data: Sequence[Any], num_blocks: int,
                 snapshot: RequestSnapshot | None) -> str: ...

    def release_reservation(self, request_id: str) -> None: ...

    def abort_request(self, request_id: str) -> Any: ...


class MigrationStatus(enum.Enum):
    COMMITTED = "committed"
    ABORTED_SRC = "aborted_src"  # the source's side: finished, preempted, too many stages
    ABORTED_DST = "aborted_dst"  # the destination's side: no room, or refused at commit


@dataclass(frozen=True)
class MigrationConfig:
    max_stages: int = 3  # Llumnix's MIGRATION_MAX_STAGES
    last_stage_max_blocks: int = 16  # Llumnix's MIGRATION_LAST_STAGE_MAX_BLOCKS

    def __post_init__(self) -> None:
        if self.max_stages < 1 or self.last_stage_max_blocks < 0:
            raise ValueError("need max_stages >= 1 and last_stage_max_blocks >= 0")


@dataclass(frozen=True)
class MigrationResult:
    status: MigrationStatus
    reason: str
    num_stages: int
    num_blocks: int  # blocks copied
    downtime_s: float  # from stopping the request on the source to its import
    num_bytes: int = 0  # block data copied


def reason_kind(reason: str) -> str:
    """An abort reason as a label: without request ids or numbers (metrics, reports)."""
    return reason.split(":")[0][:60] if reason else ""


class StagedMigration:
    """Moves one request from ``source`` to ``destination``; call ``step()`` between
    source steps until it returns a result."""

    def __init__(self, source: MigrationSource, destination: MigrationDestination,
                 request_id: str, config: MigrationConfig | None = None,
                 transport: Transport = lambda data: data,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """``clock``: the time downtime is measured in (the source's ``stopped_s``)."""
        self.source = source
        self.destination = destination
        self.request_id = request_id
        self.config = config or MigrationConfig()
        self.transport = transport
        self.clock = clock
        self._num_preemptions: int | None = None  # as of the first stage
        self._sent: tuple[int, ...] = ()  # source blocks copied so far, in table order
        self._on_host = False
        self._num_bytes = 0
        self.num_stages = 0
        self.result: MigrationResult | None = None

    def step(self) -> MigrationResult | None:
        """Run one stage; the result once the move committed or aborted, else None."""
        out = self.begin_stage()
        return self.result if out is None else self.end_stage(out)

    def begin_stage(self) -> StageOut | None:
        """The source's half of the next stage: its checks, the blocks to copy (and on the
        last stage the stop). None if the move ended instead (``result``)."""
        if self.result is not None:
            return None
        if self.num_stages >= self.config.max_stages:
            self._abort(MigrationStatus.ABORTED_SRC, f"not done in {self.config.max_stages} stages")
            return None
        self.num_stages += 1
        out = self.source.stage_out(self.request_id, self._sent, self._on_host,
                                    self._num_preemptions, self.config.last_stage_max_blocks)
        if out.reason:
            self._abort(MigrationStatus.ABORTED_SRC, out.reason)
            return None
        self._num_preemptions = out.num_preemptions
        return out

    def end_stage(self, out: StageOut) -> MigrationResult | None:
        """The rest of the stage ``begin_stage`` returned: the data to the destination,
        its half, and the commit after the last stage. The result once the move ended."""
        reason = self.destination.stage_in(self.request_id, out.on_host,
                                           self.transport(out.data), len(out.block_ids),
                                           out.snapshot)
        if reason:
            if out.snapshot is not None:  # it stopped on the source: it resumes there
                self.source.end_export(self.request_id, committed=False)
            return self._abort(MigrationStatus.ABORTED_DST, reason)
        self._sent += out.block_ids
        self._on_host = out.on_host
        self._num_bytes += sum(_nbytes(rank_data) for rank_data in out.data)
        if out.snapshot is None:
            return None
        downtime_s = self.clock() - out.stopped_s
        if not self.source.end_export(self.request_id, committed=True):
            # Its client cancelled it while it was stopped: end the copy too.
            self.destination.abort_request(self.request_id)
            return self._done(MigrationStatus.ABORTED_SRC, "the request was cancelled", 0.0)
        return self._done(MigrationStatus.COMMITTED, "", downtime_s)

    def _abort(self, status: MigrationStatus, reason: str) -> MigrationResult:
        self.destination.release_reservation(self.request_id)
        return self._done(status, reason, 0.0)

    def _done(self, status: MigrationStatus, reason: str, downtime_s: float) -> MigrationResult:
        self.result = MigrationResult(status, reason, self.num_stages, len(self._sent),
                                      downtime_s, self._num_bytes)
        return self.result


def _nbytes(data: Any) -> int:
    nbytes = getattr(data, "nbytes", None)  # numpy
    if nbytes is None:
        nbytes = data.numel() * data.element_size()  # torch
    return int(nbytes)
