"""Moving a request to another engine (live migration, Llumnix-style): the engine's seams
(``RequestMigration``) and the request as plain data (``RequestSnapshot``).

``RequestSnapshot`` is everything an engine holds of a request apart from its KV blocks:
tokens, progress, sampling parameters, the sampling RNG's state, the detokenizer's
offsets and the policy's own state (MLFQ level and attained service, apt's SLO record).
Times travel as ages, not clock readings: clocks differ between processes. The KV moves
separately (``LLMEngine.read_blocks`` / ``write_blocks``), in one piece or in stages.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.block_manager import BlockManager
from ..core.request import CacheMode, Request, SamplingParams
from ..core.scheduler import Scheduler
from ..core.scheduler.load import InstanceLoad, instance_load
from .executor import Executor
from .sampler import generator_state, new_generator
from .tokenizer import IncrementalDetokenizer, TextTokenizer


@dataclass(frozen=True)
class RequestSnapshot:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling: SamplingParams
    num_computed_tokens: int
    num_preemptions: int
    cache_mode: CacheMode
    age_s: float  # since arrival
    started_age_s: float | None  # since first scheduled; None: never scheduled
    ttft_slo_s: float | None
    tbt_slo_s: float | None
    generator_state: bytes | None
    detokenizer_state: dict[str, Any]
    policy: str
    policy_state: dict[str, Any] = field(default_factory=dict)
    # Where its KV is on the source (``on_host``) and in how many blocks; 0 blocks: it
    # holds no cache (never started, or preempted by recomputation).
    on_host: bool = False
    num_blocks: int = 0
    # Last, with a default: a snapshot made before priorities existed reads "normal".
    priority: str = "normal"

    @classmethod
    def of(cls, request: Request, now_s: float, generator_state: bytes | None, policy: str,
           policy_state: dict[str, Any], on_host: bool, num_blocks: int) -> RequestSnapshot:
        started = request.first_scheduled_time_s
        return cls(
            request_id=request.request_id,
            prompt_token_ids=tuple(request.prompt_token_ids),
            output_token_ids=tuple(request.output_token_ids),
            sampling=request.sampling,
            num_computed_tokens=request.num_computed_tokens,
            num_preemptions=request.num_preemptions,
            cache_mode=request.cache_mode,
            age_s=now_s - request.arrival_time_s,
            started_age_s=None if started is None else now_s - started,
            ttft_slo_s=request.ttft_slo_s,
            tbt_slo_s=request.tbt_slo_s,
            generator_state=generator_state,
            detokenizer_state=request.detokenizer.export_state(),
            policy=policy,
            policy_state=policy_state,
            on_host=on_host,
            num_blocks=num_blocks,
            priority=request.priority,
        )

    def to_request(self, now_s: float) -> Request:
        """The request again (without its RNG and detokenizer: the engine attaches them)."""
        return Request(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            sampling=self.sampling,
            arrival_time_s=now_s - self.age_s,
            output_token_ids=list(self.output_token_ids),
            num_computed_tokens=self.num_computed_tokens,
            num_preemptions=self.num_preemptions,
            first_scheduled_time_s=(None if self.started_age_s is None
                                    else now_s - self.started_age_s),
            cache_mode=self.cache_mode,
            ttft_slo_s=self.ttft_slo_s,
            tbt_slo_s=self.tbt_slo_s,
            priority=self.priority,
        )


@dataclass
class StageOut:
    """The source's half of one migration stage, taken between two of its steps.

    ``reason``: why the move cannot go on ("" if it can). Otherwise ``block_ids`` are the
    blocks to send this stage (of tier ``on_host``) and ``data`` their contents (one CPU
    tensor per rank). On the last stage the request has stopped (``snapshot`` is set,
    ``stopped_s`` is when, by ``time.perf_counter``) and ``block_ids`` are all its blocks
    not sent yet, the one still filling included.
    """

    reason: str = ""
    on_host: bool = False
    block_ids: tuple[int, ...] = ()
    data: Sequence[Any] = ()
    num_preemptions: int = 0
    snapshot: RequestSnapshot | None = None
    stopped_s: float = 0.0


class RequestMigration:
    """The engine's seams for moving a request to another engine of the same model::

        the source:      snapshot = export_request(id)      (no longer scheduled; MIGRATING)
                         kv = read_blocks(*request_blocks(id))   (at once, or in stages)
        the destination: reserve_blocks(id, n, on_host); write_blocks(ids, on_host, kv)
                         import_request(snapshot)           (continues where it stopped)
        the source:      finish_export(id) once the destination has it (blocks freed),
                         or cancel_export(id) if the move failed (it resumes here).

    A part of ``LLMEngine`` (its base class), kept apart: it uses the engine's scheduler,
    block manager, executor, tokenizer, device and limits.
    """

    scheduler: Scheduler
    block_manager: BlockManager
    executor: Executor
    tokenizer: TextTokenizer
    device: torch.device
    max_model_len: int
    tensor_parallel_size: int
    hidden_unavailable_reason: str

    # -- one stage of a staged move, each side in one call (``cluster/migration.py``) ----

    def stage_out(self, request_id: str, sent: tuple[int, ...], sent_on_host: bool,
                  num_preemptions: int | None, last_stage_max_blocks: int,
                  read: bool = True) -> StageOut:
        """The source's side of a stage: check the request is as the previous stage left
        it (``sent``: its blocks copied so far, from tier ``sent_on_host``; it was
        preempted ``num_preemptions`` times, None on the first stage), then read the
        blocks to copy. The last stage (at most ``last_stage_max_blocks`` left, or the
        cache on the host tier, frozen) stops the request first (``export_request``).

        ``read=False`` leaves ``data`` empty for the caller to read outside the engine's
        thread, where that is safe (``concurrent_reads``): the blocks are full, so
        nothing writes them; a stage's blocks stay the request's until it finishes or is
        preempted, which the next stage checks; the last stage's are pinned."""
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return StageOut("the request finished or left the source")
        if num_preemptions is not None and request.num_preemptions != num_preemptions:
            return StageOut("the request was preempted")
        on_host, block_ids = self.request_blocks(request_id)
        if sent and (on_host != sent_on_host or block_ids[:len(sent)] != sent):
            return StageOut("the request's blocks moved")
        remaining = block_ids[len(sent):]
        if on_host or len(remaining) <= last_stage_max_blocks:
            stopped_s = time.perf_counter()
            snapshot = self.export_request(request_id)  # it stops here
            return StageOut("", on_host, remaining, self.read_blocks(remaining, on_host)
                            if remaining and read else (), request.num_preemptions,
                            snapshot, stopped_s)
        to_send = remaining[:-1]  # the last block is still filling
        return StageOut("", on_host, to_send, self.read_blocks(to_send, on_host)
                        if to_send and read else (), request.num_preemptions)

    @property
    def concurrent_reads(self) -> bool:
        """Whether ``read_blocks`` may run beside a step on another thread: one rank on
        the CPU (no pipe to the worker ranks to share, no copy stream)."""
        return self.tensor_parallel_size == 1 and self.device.type == "cpu"

    def stage_in(self, request_id: str, on_host: bool, data: Sequence[Any], num_blocks: int,
                 snapshot: RequestSnapshot | None) -> str:
        """The destination's side of a stage: reserve ``num_blocks`` more blocks, write
        ``data`` there and, on the last stage (``snapshot``), take the request in. Returns
        why it could not ("" if it did); the reservation is then the caller's to release."""
        if num_blocks:
            reserved = self.reserve_blocks(request_id, num_blocks, on_host)
            if reserved is None:
                return "destination out of blocks"
            self.write_blocks(reserved, on_host, data)
        if snapshot is not None:
            try:
                self.import_request(snapshot)
            except ValueError as exc:
                return f"refused at commit: {exc}"
        return ""

    def end_export(self, request_id: str, committed: bool) -> bool:
        """``finish_export`` (the destination has it) or ``cancel_export`` (it resumes
        here). False if the request is gone already: cancelled by its client meanwhile."""
        if request_id not in self.scheduler.detached:
            return False
        if committed:
            self.finish_export(request_id)
        else:
            self.cancel_export(request_id)
        return True

    def load(self) -> InstanceLoad:
        """This instance's freeness as Llumnix defines it (``core/scheduler/load.py``)."""
        return instance_load(self.scheduler)

    def migration_candidates(self) -> list[str]:
        """Requests that may move: started, holding their cache in either tier."""
        return self.scheduler.migration_candidates()

    def request_blocks(self, request_id: str) -> tuple[bool, tuple[int, ...]]:
        """(on the host tier, block ids) of a request's cache; no blocks if it has none."""
        bm = self.block_manager
        if bm.is_on_host(request_id):
            return True, bm.host_block_ids(request_id)
        return False, bm.block_ids(request_id)

    def export_request(self, request_id: str) -> RequestSnapshot:
        """Stop scheduling a request and describe it for another engine.

        Its blocks stay pinned (nothing reuses them) until ``finish_export`` or
        ``cancel_export``; a cancel from the client meanwhile aborts it as usual.
        Raises ``KeyError`` if the request is not scheduled here.
        """
        request = self.scheduler.requests[request_id]
        policy_state = self.scheduler.detach(request_id)
        self.block_manager.pin(request_id)
        on_host, block_ids = self.request_blocks(request_id)
        return RequestSnapshot.of(request, time.monotonic(), generator_state(request.generator),
                                  self.scheduler.policy_name, policy_state, on_host,
                                  len(block_ids))

    def finish_export(self, request_id: str) -> None:
        """The destination has the request: free it here."""
        self.scheduler.release_detached(request_id)
        self.block_manager.unpin(request_id)

    def cancel_export(self, request_id: str) -> None:
        """The move failed: the request resumes here, where it stopped."""
        self.scheduler.reattach(request_id)
        self.block_manager.unpin(request_id)

    def read_blocks(self, block_ids: Sequence[int], on_host: bool) -> list[torch.Tensor]:
        """The contents of the given blocks of one tier: one CPU tensor per rank."""
        return self.executor.read_blocks(block_ids, on_host)

    def write_blocks(self, block_ids: Sequence[int], on_host: bool,
                     data: Sequence[torch.Tensor]) -> None:
        """Write ``read_blocks``' result (of a like engine) into the given blocks."""
        self.executor.write_blocks(block_ids, on_host, data)

    def reserve_blocks(self, request_id: str, num_blocks: int,
                       on_host: bool = False) -> list[int] | None:
        """Set aside (more) blocks for a request arriving from another engine; None if
        the tier is short. ``import_request`` adopts them, ``release_reservation`` not."""
        return self.block_manager.reserve(request_id, num_blocks, on_host)

    def release_reservation(self, request_id: str) -> None:
        self.block_manager.release_reservation(request_id)

    def import_request(self, snapshot: RequestSnapshot) -> None:
        """Continue a request exported by another engine of the same model.

        Its cache (``snapshot.num_blocks`` blocks in the tier it had) must be in blocks
        reserved here and written already. Raises ``ValueError`` if the request cannot
        run here; the reservation is then left to the caller to release.
        """
        request_id = snapshot.request_id
        bm = self.block_manager
        if request_id in self.scheduler.requests or request_id in self.scheduler.detached:
            raise ValueError(f"duplicate request id {request_id!r}")
        hidden = snapshot.cache_mode is CacheMode.HIDDEN
        if hidden and not bm.supports_hidden:
            raise ValueError("the request is in hidden cache mode, unavailable here: "
                             f"{self.hidden_unavailable_reason}")
        total = len(snapshot.prompt_token_ids) + snapshot.sampling.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"the request needs {total} tokens of context; this engine "
                             f"has {self.max_model_len}")
        reserved = bm.reserved_blocks(request_id, snapshot.on_host)
        if len(reserved) != snapshot.num_blocks:
            raise ValueError(f"{request_id!r}: {len(reserved)} blocks reserved in the "
                             f"{'host' if snapshot.on_host else 'device'} tier for a cache "
                             f"of {snapshot.num_blocks}")
        request = snapshot.to_request(time.monotonic())
        request.generator = new_generator(request.sampling, self.device,
                                          snapshot.generator_state)
        request.detokenizer = IncrementalDetokenizer.restore(self.tokenizer,
                                                             snapshot.detokenizer_state)
        if snapshot.num_blocks:
            bm.adopt(request_id, hidden=hidden, on_host=snapshot.on_host)
        same_policy = snapshot.policy == self.scheduler.policy_name
        self.scheduler.adopt(request, snapshot.policy_state if same_policy else None)
