"""Moves of requests in the cluster simulator (``sim/cluster.py``): what a stage costs
(``MigrationCost``: fixed + bytes / bandwidth, fitted on this machine or assumed for a GPU)
and the migration endpoints over a simulated instance, which let the server's own
``StagedMigration`` run on a scheduler and block manager that hold no data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..cluster.migration import StagedMigration
from ..core.request import Request, RequestStatus
from .cost_model import IterationCostModel
from .simulator import SimInstance

if TYPE_CHECKING:  # annotations only: importing it needs torch
    from ..engine.migration import StageOut

# -- what a stage costs -------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationCost:
    """Virtual time of one migration stage: ``fixed_s + bytes / bytes_per_s``."""

    fixed_s: float
    bytes_per_s: float
    source: str = ""

    def __post_init__(self) -> None:
        if self.fixed_s < 0 or self.bytes_per_s <= 0:
            raise ValueError("need fixed_s >= 0 and bytes_per_s > 0")

    def stage_time_s(self, num_bytes: int) -> float:
        return self.fixed_s + num_bytes / self.bytes_per_s


# Least-squares fits of the medians of ``docs/benchmarks.md`` "Migration transports"
# (stage times between two Ray instance actors on this project's 2-core machine,
# 2026-11-30: the middle of each size's range over three runs) over 1-16 MiB, the sizes
# of a last stage (at most 16 blocks), which is what a move's downtime pays. Over the
# whole 1-64 MiB range the object store fits 4.3 ms + 1.9 GB/s (within 15% of each
# median from 4 MiB up) and gloo 1.6 ms + 1.9 GB/s.
MIGRATION_COSTS = {
    "object_store": MigrationCost(
        3.4e-3, 1.5e9, "object store between Ray actors, fitted on 1-16 MiB stage medians "
        "(docs/benchmarks.md, Migration transports)"),
    "gloo": MigrationCost(
        1.9e-3, 2.0e9, "gloo between Ray actors, fitted on 1-16 MiB stage medians "
        "(docs/benchmarks.md, Migration transports)"),
}
# GPU (assumed, not measured here): each stage crosses PCIe twice (device to host on the
# source, host to device on the destination) at the profile's swap bandwidth, the network
# no slower; 20 ms fixed, Llumnix's measured downtime floor for LLaMA-7B on A10s (20-30 ms
# whatever the length, llumnix.md 1.8), which a last stage of a few blocks barely adds to.
GPU_FIXED_S = 0.020
MIGRATION_COST_NAMES = ("auto", "object_store", "gloo", "gpu")


def migration_cost(name: str, cost_model: IterationCostModel,
                   transport: str = "object_store") -> MigrationCost:
    """A named stage cost. ``auto``: ``gpu`` for a GPU profile (its swaps overlap
    compute: a copy stream), else the cluster's ``migration_transport``."""
    if name == "auto":
        name = "gpu" if cost_model.swap_overlaps_compute else transport
    if name == "gpu":
        bandwidth = cost_model.swap_bytes_per_s
        if bandwidth == float("inf"):
            raise ValueError("the profile has no swap bandwidth for the gpu migration cost")
        return MigrationCost(GPU_FIXED_S, bandwidth / 2,
                             "gpu: assumed, two PCIe crossings at the profile's swap "
                             "bandwidth + 20 ms (Llumnix's A10 downtime floor)")
    if name not in MIGRATION_COSTS:
        raise ValueError(f"unknown migration cost {name!r}; choices: {list(MIGRATION_COST_NAMES)}")
    return MIGRATION_COSTS[name]


# -- configuration and results ------------------------------------------------------------


# -- the migration endpoints over a simulated instance ------------------------------------


class _NoData:
    """A stage's block data as the simulator carries it: only its size."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


@dataclass
class _StageOut:
    """``engine/migration.py``'s ``StageOut``, field for field (that module needs torch)."""

    reason: str = ""
    on_host: bool = False
    block_ids: tuple[int, ...] = ()
    data: tuple[Any, ...] = ()
    num_preemptions: int = 0
    snapshot: _Moved | None = None
    stopped_s: float = 0.0


@dataclass(frozen=True)
class _Moved:
    """What the last stage hands over instead of a ``RequestSnapshot``: the detached
    request itself (one process, one clock) with its policy's state."""

    request: Request
    policy_state: dict[str, Any]
    on_host: bool
    num_blocks: int


def _request_blocks(instance: SimInstance, request_id: str) -> tuple[bool, tuple[int, ...]]:
    bm = instance.block_manager
    if bm.is_on_host(request_id):
        return True, bm.host_block_ids(request_id)
    return False, bm.block_ids(request_id)


class _Source:
    """``MigrationSource`` over one simulated instance: ``RequestMigration.stage_out`` and
    ``end_export`` (``engine/migration.py``) on its scheduler and block manager."""

    def __init__(self, instance: SimInstance, clock: Callable[[], float],
                 block_bytes: int) -> None:
        self.instance = instance
        self.clock = clock
        self.block_bytes = block_bytes

    def _data(self, block_ids: tuple[int, ...]) -> tuple[Any, ...]:
        return (_NoData(len(block_ids) * self.block_bytes),) if block_ids else ()

    def stage_out(self, request_id: str, sent: tuple[int, ...], sent_on_host: bool,
                  num_preemptions: int | None, last_stage_max_blocks: int) -> StageOut:
        scheduler = self.instance.scheduler
        request = scheduler.requests.get(request_id)
        if request is None:
            return _out(_StageOut("the request finished or left the source"))
        if num_preemptions is not None and request.num_preemptions != num_preemptions:
            return _out(_StageOut("the request was preempted"))
        on_host, block_ids = _request_blocks(self.instance, request_id)
        if sent and (on_host != sent_on_host or block_ids[:len(sent)] != sent):
            return _out(_StageOut("the request's blocks moved"))
        remaining = block_ids[len(sent):]
        if on_host or len(remaining) <= last_stage_max_blocks:
            state = scheduler.detach(request_id)  # it stops here
            self.instance.block_manager.pin(request_id)
            moved = _Moved(request, state, on_host, len(block_ids))
            return _out(_StageOut("", on_host, remaining, self._data(remaining),
                                  request.num_preemptions, moved, self.clock()))
        to_send = remaining[:-1]  # the last block is still filling
        return _out(_StageOut("", on_host, to_send, self._data(to_send),
                              request.num_preemptions))

    def end_export(self, request_id: str, committed: bool) -> bool:
        scheduler = self.instance.scheduler
        if request_id not in scheduler.detached:
            return False
        if committed:
            scheduler.release_detached(request_id)
        else:
            scheduler.reattach(request_id)
        self.instance.block_manager.unpin(request_id)
        return True


class _Destination:
    """``MigrationDestination`` over one simulated instance: ``RequestMigration.stage_in``
    (reserve; on the last stage ``import_request``'s checks, adopt the blocks and
    ``scheduler.adopt`` the request), ``release_reservation`` and ``abort_request``."""

    def __init__(self, instance: SimInstance) -> None:
        self.instance = instance

    def stage_in(self, request_id: str, on_host: bool, data: Any, num_blocks: int,
                 snapshot: Any) -> str:
        bm, scheduler = self.instance.block_manager, self.instance.scheduler
        if num_blocks and bm.reserve(request_id, num_blocks, on_host) is None:
            return "destination out of blocks"
        if snapshot is None:
            return ""
        moved = cast(_Moved, snapshot)
        request = moved.request
        if request_id in scheduler.requests or request_id in scheduler.detached:
            return f"refused at commit: duplicate request id {request_id!r}"
        if request.hidden and not bm.supports_hidden:
            return "refused at commit: the request is in hidden cache mode, unavailable here"
        reserved = bm.reserved_blocks(request_id, moved.on_host)
        if len(reserved) != moved.num_blocks:
            return (f"refused at commit: {len(reserved)} blocks reserved for a cache of "
                    f"{moved.num_blocks}")
        if moved.num_blocks:
            bm.adopt(request_id, hidden=request.hidden, on_host=moved.on_host)
        scheduler.adopt(request, moved.policy_state)
        return ""

    def release_reservation(self, request_id: str) -> None:
        self.instance.block_manager.release_reservation(request_id)

    def abort_request(self, request_id: str) -> None:
        self.instance.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)


def _out(out: _StageOut) -> StageOut:
    return cast("StageOut", out)


# -- the simulator --------------------------------------------------------------------------


@dataclass(eq=False)
class _Move:
    source: int
    destination: int
    drain: bool = False  # the source is being drained: any request, waiting ones first
    migration: StagedMigration | None = None


class _Call:
    """A call waiting in an instance's inbox (runs between two of its steps)."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., None], *args: Any) -> None:
        self.fn = fn
        self.args = args
