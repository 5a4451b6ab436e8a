"""Discrete-event simulation of one engine: the real scheduler and block manager, a cost model.

The engine loop (``serving/engine_loop.py`` + ``LLMEngine.step``) does, forever::

    drain the inbox (add_request for each arrival)
    output = scheduler.schedule()          # MLFQ commits pending frees inside
    execute swaps, forward, sample         # <- replaced by the cost model's time
    scheduler.update_from_output(output, sampled, step_time_s)

The simulator makes the same calls in the same order on a virtual clock (the scheduler's
injected ``clock``). Each sampled token is emitted at its iteration's end; the client sees
it ``response_latency_s`` later, and a request reaches the engine ``request_latency_s``
after its arrival. Any registered policy runs unchanged; policies that declare
``requires_cost_model`` get the cost model itself.
"""

from __future__ import annotations

import logging
import random
import time
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..bench.metrics import SLO, RequestTimeline
from ..config import SchedulerConfig, serving_config_from_parameters
from ..core.block_manager import BlockManager
from ..core.cache_sizes import pool_sizes
from ..core.request import Request, SamplingParams
from ..core.scheduler import create_scheduler, policy_class
from ..core.scheduler.output import SchedulerOutput, hidden_recompute_blocks
from .cost_model import BatchShape, IterationCostModel, batch_shape
from .events import EventKind, EventQueue

logger = logging.getLogger(__name__)

# The simulated model samples this id; with no end_id a request ends at max_tokens.
_TOKEN_ID = 0
_MAX_EMPTY_ITERATIONS = 10_000


@dataclass(frozen=True)
class SimConfig:
    scheduler: SchedulerConfig
    num_blocks: int
    block_size: int
    num_host_blocks: int = 0
    max_model_len: int | None = None
    block_bytes: int = 0
    check_invariants: bool = False  # check_invariants() after every call (slow)
    # Hidden-state cache (apt): tokens per block in hidden mode; 0 disables it.
    hidden_tokens_per_block: int = 0
    # Seeds the draws of the cost model's measured iteration-time noise (if it has any).
    noise_seed: int = 0
    # The serving loop's max_queue_size: requests beyond that many never-scheduled ones
    # are refused on arrival (counted as rejected). 0: unbounded.
    max_queue_size: int = 0

    @classmethod
    def from_parameters(
        cls,
        parameters: Mapping[str, str],
        cost_model: IterationCostModel,
        check_invariants: bool = False,
    ) -> SimConfig:
        """The engine's sizes from the same ``config.pbtxt`` parameters the server reads."""
        serving = serving_config_from_parameters(parameters)
        engine = serving.engine
        if cost_model.kv_bytes_per_token <= 0:
            raise ValueError("the cost model has no kv_bytes_per_token to size the pools")
        # A profiled recompute cost means the engine offers hidden mode (it measures one
        # only where the model's shape allows the mode).
        sizes = pool_sizes(
            engine.cache,
            cost_model.kv_bytes_per_token,
            cost_model.max_model_len,
            hidden_possible=cost_model.hidden_recompute_s_per_block is not None,
            max_model_len=engine.max_model_len,
        )
        return cls(
            engine.scheduler,
            sizes.num_blocks,
            sizes.block_size,
            sizes.num_host_blocks,
            sizes.max_model_len,
            sizes.block_bytes,
            check_invariants,
            hidden_tokens_per_block=sizes.hidden_tokens_per_block,
            max_queue_size=serving.max_queue_size,
        )


@dataclass
class _Tracked:
    index: int
    arrival_s: float
    input_tokens: int
    token_times_s: array = field(default_factory=lambda: array("d"))


@dataclass
class SimResult:
    policy: str
    tracked: list[_Tracked]
    finish_s: dict[int, float]
    rejected: list[int]
    num_iterations: int = 0
    busy_s: float = 0.0
    swap_s: float = 0.0
    num_swap_outs: int = 0
    num_swap_ins: int = 0
    num_preemptions: int = 0
    num_recomputations: int = 0
    num_recomputed_tokens: int = 0  # tokens whose K/V were dropped and computed again
    max_recomputations_per_request: int = 0
    num_queue_full: int = 0  # refused by max_queue_size (also in ``rejected``)
    num_blocks_swapped_out: int = 0
    num_blocks_swapped_in: int = 0
    num_hidden_tokens: int = 0  # tokens computed in hidden-cache mode (the server's counter)
    end_s: float = 0.0
    wall_s: float = 0.0

    def timelines(self) -> list[RequestTimeline]:
        """Finished requests as the client would see them (rejected ones left out)."""
        return [
            RequestTimeline(
                str(t.index), t.arrival_s, t.input_tokens, t.token_times_s, self.finish_s[t.index]
            )
            for t in self.tracked
            if t.index in self.finish_s
        ]

    def counters(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "num_iterations",
                "busy_s",
                "swap_s",
                "num_swap_outs",
                "num_swap_ins",
                "num_preemptions",
                "num_recomputations",
                "num_recomputed_tokens",
                "max_recomputations_per_request",
                "num_queue_full",
                "num_blocks_swapped_out",
                "num_blocks_swapped_in",
                "num_hidden_tokens",
                "end_s",
                "wall_s",
            )
        } | {"num_rejected": len(self.rejected)}


class SimInstance:
    """One simulated engine: the real scheduler and block manager on an injected clock, and
    the cost model's iteration time (with its seeded noise). ``Simulator`` drives one;
    ``sim/cluster.py``'s ``ClusterSimulator`` drives many on one event queue."""

    def __init__(self, config: SimConfig, cost_model: IterationCostModel,
                 clock: Callable[[], float], noise_seed: int | None = None) -> None:
        """``noise_seed``: seeds the iteration-time noise (default ``config.noise_seed``)."""
        self.config = config
        self.cost_model = cost_model
        self._noise = random.Random(config.noise_seed if noise_seed is None else noise_seed)
        self._trace_pos: int | None = None  # where the noise trace is replayed from
        self.block_manager = BlockManager(
            config.num_blocks,
            config.block_size,
            config.num_host_blocks,
            config.hidden_tokens_per_block,
        )
        needs_model = policy_class(config.scheduler.policy).requires_cost_model
        self.scheduler = create_scheduler(
            config.scheduler,
            self.block_manager,
            clock=clock,
            cost_model=cost_model if needs_model else None,
        )
        # What this engine did (``SimResult``'s counters of the same names).
        self.num_iterations = 0
        self.busy_s = 0.0
        self.swap_s = 0.0
        self.num_hidden_tokens = 0
        self._empty_in_a_row = 0
        self.num_repeated_steps = 0  # of num_iterations, run without planning (repeat.py)
        # The next iteration's time over its batch's (the cluster simulator sets it from
        # the instances sharing the machine: ``co_running_slowdown``).
        self.slowdown = 1.0

    def plan(self) -> tuple[SchedulerOutput, float]:
        """``schedule()`` one iteration; returns it with its modelled duration."""
        output = self.scheduler.schedule()
        if self.config.check_invariants:
            self.block_manager.check_invariants()
        duration_s, swap_s = self.iteration_time_s(output)
        self.num_iterations += 1
        self.busy_s += duration_s
        self.swap_s += swap_s
        if self.block_manager.supports_hidden:  # else no item is in hidden mode
            self.num_hidden_tokens += sum(item.num_tokens for item in output.scheduled
                                          if item.hidden)
        self._empty_in_a_row = self._empty_in_a_row + 1 if output.is_empty else 0
        if self._empty_in_a_row > _MAX_EMPTY_ITERATIONS:
            raise RuntimeError(
                f"{self.config.scheduler.policy}: the scheduler planned "
                f"{_MAX_EMPTY_ITERATIONS} empty iterations in a row"
            )
        return output, duration_s

    def repeated_step(self, shape: BatchShape) -> float:
        """``plan``'s accounting for a step that repeats the last plan (``sim/repeat.py``:
        all decodes, no swaps, no hidden-mode item): its duration, drawn as
        ``iteration_time_s`` draws it."""
        cost = self.cost_model
        duration_s = cost.iteration_time_s(shape) * self.slowdown
        if cost.noise_trace or cost.noise_quantiles:
            duration_s *= self._noise_factor()
        self.num_iterations += 1
        self.num_repeated_steps += 1
        self.busy_s += duration_s
        if self.config.check_invariants:
            self.block_manager.check_invariants()
        return duration_s

    def finish(self, output: SchedulerOutput,
               duration_s: float) -> tuple[dict[str, int], list[Request]]:
        """The iteration's results: (tokens sampled by request id, requests finished)."""
        sampled = {request_id: _TOKEN_ID
                   for request_id, _, _, _, sample, _ in output.scheduled if sample}
        finished = self.scheduler.update_from_output(output, sampled, duration_s)
        if self.config.check_invariants:
            self.block_manager.check_invariants()
        return sampled, finished

    def admit(self, request: Request) -> bool:
        """``LLMEngine.add_request``'s length check, then the scheduler's; False: rejected."""
        max_len = self.config.max_model_len
        if max_len is not None and request.max_total_tokens > max_len:
            return False
        try:
            self.scheduler.add_request(request)
        except ValueError:
            return False
        return True

    def add_counters(self, result: SimResult) -> None:
        """Add this engine's counters to ``result``'s."""
        sched = self.scheduler
        result.num_iterations += self.num_iterations
        result.busy_s += self.busy_s
        result.swap_s += self.swap_s
        result.num_hidden_tokens += self.num_hidden_tokens
        result.num_preemptions += sched.num_preemptions_total
        result.num_recomputations += sched.num_recomputations_total
        result.num_recomputed_tokens += sched.num_recomputed_tokens_total
        result.num_swap_outs += sched.num_swap_outs
        result.num_swap_ins += sched.num_swap_ins
        result.num_blocks_swapped_out += sched.num_blocks_swapped_out
        result.num_blocks_swapped_in += sched.num_blocks_swapped_in

    def _noise_factor(self) -> float:
        """The next iteration's measured / modelled time ratio: the next value of the noise
        trace (a new random block start with probability 1 / mean block length), or an
        independent draw from the noise quantiles."""
        cost = self.cost_model
        trace = cost.noise_trace
        if not trace:
            return cost.noise_factor(self._noise.random())
        if self._trace_pos is None or self._noise.random() * cost.noise_block_iterations < 1:
            self._trace_pos = self._noise.randrange(len(trace))
        else:
            self._trace_pos = (self._trace_pos + 1) % len(trace)
        return trace[self._trace_pos]

    def iteration_time_s(self, output: SchedulerOutput) -> tuple[float, float]:
        """(iteration time, of which swaps) for one planned iteration."""
        cost = self.cost_model
        compute_s = cost.iteration_time_s(batch_shape(output))
        if cost.hidden_recompute_s_per_block:
            # Hidden-mode items past their first chunk recompute K/V of their context.
            compute_s += cost.hidden_recompute_s_per_block * hidden_recompute_blocks(
                output, self.config.block_size)
        if not output.is_empty:
            compute_s *= self.slowdown
            if cost.noise_trace or cost.noise_quantiles:
                compute_s *= self._noise_factor()
        block_bytes = self.config.block_bytes
        if cost.swap_overlaps_compute:
            # Only blocking swap-outs and swap-ins of scheduled requests hold the forward.
            waited = [s for s in output.swap_out if s.blocking]
            if output.swap_in:
                scheduled = {item.request_id for item in output.scheduled}
                waited += [s for s in output.swap_in if s.request_id in scheduled]
        else:
            waited = [*output.swap_out, *output.swap_in]
        swap_s = sum(cost.swap_time_s(s.num_blocks * block_bytes) for s in waited)
        return compute_s + swap_s, swap_s


def new_request(spec: Any, now_s: float, slo: SLO | None) -> Request:
    """The engine's request for a workload entry (the simulated model samples
    ``_TOKEN_ID``, never an end id: it ends at ``max_tokens``)."""
    request = Request(
        request_id=str(spec.index),
        prompt_token_ids=[_TOKEN_ID] * spec.input_tokens,
        sampling=SamplingParams(
            max_tokens=spec.output_tokens, min_length=spec.output_tokens, temperature=0.0
        ),
        arrival_time_s=now_s,
        priority=spec.priority,
    )
    if slo is not None:
        request.ttft_slo_s, request.tbt_slo_s = slo.ttft_s, slo.tbt_s
    return request


class Simulator:
    def __init__(
        self,
        config: SimConfig,
        cost_model: IterationCostModel,
        workload: Any,
        slo: SLO | None = None,
    ) -> None:
        """``slo``: set on every request as its own objectives (as the load generator
        sends ``ttft_slo_ms`` / ``tbt_slo_ms``); None leaves the policy's defaults."""
        self.config = config
        self.cost_model = cost_model
        self.workload = workload
        self.slo = slo
        self.now_s = 0.0
        self.instance = SimInstance(config, cost_model, clock=lambda: self.now_s)
        self.block_manager = self.instance.block_manager
        self.scheduler = self.instance.scheduler

    def run(self, on_finish: Callable[[int], None] | None = None) -> SimResult:
        """Simulate the whole workload; ``on_finish(n)`` after each ``n`` finishes."""
        wall_start = time.perf_counter()
        cost, sched, cfg, engine = self.cost_model, self.scheduler, self.config, self.instance
        events = EventQueue()
        specs = self.workload.requests
        for spec in specs:
            events.push(spec.arrival_time_s + cost.request_latency_s, EventKind.ARRIVAL, spec)
        # Indexed by position; ``_admit`` looks requests up by ``spec.index``.
        if any(spec.index != i for i, spec in enumerate(specs)):
            raise ValueError("workload request indices must be 0, 1, 2, ... in order")
        tracked = [_Tracked(s.index, s.arrival_time_s, s.input_tokens) for s in specs]
        by_id: dict[str, _Tracked] = {}
        result = SimResult(cfg.scheduler.policy, tracked, {}, [])
        inbox: list[Any] = []
        busy = False  # an iteration is in flight or a STEP is queued
        response_latency_s = cost.response_latency_s
        while events:
            now, kind, payload = events.pop()
            self.now_s = now
            if kind is EventKind.ARRIVAL:
                inbox.append(payload)
                if not busy:
                    busy = True
                    events.push(now, EventKind.STEP)
            elif kind is EventKind.STEP:
                for spec in inbox:
                    self._admit(spec, tracked, by_id, result)
                inbox.clear()
                if not sched.has_unfinished():
                    busy = False
                    continue
                output, duration_s = engine.plan()
                events.push(now + duration_s, EventKind.ITERATION_END, (output, duration_s))
            else:
                output, duration_s = payload
                sampled, finished = engine.finish(output, duration_s)
                emitted_s = now + response_latency_s
                for request_id in sampled:
                    by_id[request_id].token_times_s.append(emitted_s)
                for request in finished:
                    result.max_recomputations_per_request = max(
                        result.max_recomputations_per_request, request.num_preemptions)
                    t = by_id.pop(request.request_id)
                    result.finish_s[t.index] = emitted_s
                    if on_finish is not None:
                        on_finish(1)
                events.push(now, EventKind.STEP)
        engine.add_counters(result)
        result.end_s = self.now_s
        result.wall_s = time.perf_counter() - wall_start
        if by_id:
            raise RuntimeError(f"{len(by_id)} requests never finished")
        return result

    def _admit(
        self, spec: Any, tracked: list[_Tracked], by_id: dict[str, _Tracked], result: SimResult
    ) -> None:
        """The serving loop's queue limit, ``LLMEngine.add_request``'s checks, then the
        scheduler's."""
        max_queue_size = self.config.max_queue_size
        if max_queue_size and self.scheduler.num_waiting >= max_queue_size:
            result.rejected.append(spec.index)
            result.num_queue_full += 1
            return
        if not self.instance.admit(new_request(spec, self.now_s, self.slo)):
            result.rejected.append(spec.index)
            return
        by_id[str(spec.index)] = tracked[spec.index]  # positions: see run()

    def _iteration_time_s(self, output: SchedulerOutput) -> tuple[float, float]:
        """(iteration time, of which swaps) for one planned iteration."""
        return self.instance.iteration_time_s(output)

    def _noise_factor(self) -> float:
        """The next iteration's measured / modelled time ratio (``SimInstance``'s)."""
        return self.instance._noise_factor()
