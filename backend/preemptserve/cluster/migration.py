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

The engines are driven from one thread here (both in one process, the transport a
function call); across processes a transport carries the block data.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.llm_engine import LLMEngine

# Block data of every rank (what ``LLMEngine.read_blocks`` returns) from source to
# destination; in one process, the identity.
Transport = Callable[[Sequence[Any]], Sequence[Any]]


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


class StagedMigration:
    """Moves one request from ``source`` to ``destination``; call ``step()`` between
    source steps until it returns a result."""

    def __init__(self, source: LLMEngine, destination: LLMEngine, request_id: str,
                 config: MigrationConfig | None = None,
                 transport: Transport = lambda data: data) -> None:
        self.source = source
        self.destination = destination
        self.request_id = request_id
        self.config = config or MigrationConfig()
        self.transport = transport
        request = source.scheduler.requests.get(request_id)
        self._num_preemptions = None if request is None else request.num_preemptions
        self._sent: tuple[int, ...] = ()  # source blocks copied so far, in table order
        self._on_host: bool | None = None
        self.num_stages = 0
        self.result: MigrationResult | None = None

    def step(self) -> MigrationResult | None:
        """Run one stage; the result once the move committed or aborted, else None."""
        if self.result is not None:
            return self.result
        reason = self._source_changed()
        if reason:
            return self._abort(MigrationStatus.ABORTED_SRC, reason)
        if self.num_stages >= self.config.max_stages:
            return self._abort(MigrationStatus.ABORTED_SRC,
                               f"not done in {self.config.max_stages} stages")
        self.num_stages += 1
        on_host, block_ids = self.source.request_blocks(self.request_id)
        remaining = block_ids[len(self._sent):]
        if on_host or len(remaining) <= self.config.last_stage_max_blocks:
            return self._last_stage()
        if not self._copy(remaining[:-1], on_host):  # the last block is still filling
            return self._abort(MigrationStatus.ABORTED_DST, "destination out of blocks")
        return None

    def _source_changed(self) -> str:
        request = self.source.scheduler.requests.get(self.request_id)
        if request is None:
            return "the request finished or left the source"
        if request.num_preemptions != self._num_preemptions:
            return "the request was preempted"
        on_host, block_ids = self.source.request_blocks(self.request_id)
        if self._sent and (on_host != self._on_host
                           or block_ids[:len(self._sent)] != self._sent):
            return "the request's blocks moved"
        return ""

    def _copy(self, block_ids: Sequence[int], on_host: bool) -> bool:
        """Reserve room for ``block_ids`` on the destination and copy them there."""
        if not block_ids:
            return True
        reserved = self.destination.reserve_blocks(self.request_id, len(block_ids), on_host)
        if reserved is None:
            return False
        data = self.transport(self.source.read_blocks(block_ids, on_host))
        self.destination.write_blocks(reserved, on_host, data)
        self._sent += tuple(block_ids)
        self._on_host = on_host
        return True

    def _last_stage(self) -> MigrationResult:
        stopped = time.perf_counter()
        snapshot = self.source.export_request(self.request_id)  # it stops here
        on_host, block_ids = self.source.request_blocks(self.request_id)
        if not self._copy(block_ids[len(self._sent):], on_host):
            self.source.cancel_export(self.request_id)
            return self._abort(MigrationStatus.ABORTED_DST, "destination out of blocks")
        try:
            self.destination.import_request(snapshot)
        except ValueError as exc:
            self.source.cancel_export(self.request_id)
            return self._abort(MigrationStatus.ABORTED_DST, f"refused at commit: {exc}")
        downtime_s = time.perf_counter() - stopped
        self.source.finish_export(self.request_id)
        self.result = MigrationResult(MigrationStatus.COMMITTED, "", self.num_stages,
                                      len(self._sent), downtime_s)
        return self.result

    def _abort(self, status: MigrationStatus, reason: str) -> MigrationResult:
        self.destination.release_reservation(self.request_id)
        self.result = MigrationResult(status, reason, self.num_stages, len(self._sent), 0.0)
        return self.result
