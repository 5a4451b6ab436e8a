"""``skip_join_mlfq``: FastServe's skip-join multi-level feedback queue.

Queues ``Q0..Qn-1``; the quantum of ``Qi`` is ``base * ratio**i``. A new job joins the
highest queue whose quantum covers its estimated prefill time (higher queues are skipped,
so a long prompt is not demoted through every level). Each iteration a job runs adds the
iteration's measured time to its attained service; past its queue's quantum it is demoted
one level. A job that has not run for the starvation threshold returns to ``Q0``.

Every iteration the batch is refilled from the highest queue down (preemption at every
iteration boundary, at token granularity). A preempted job keeps its KV on the device
while it fits; proactive offload keeps a reserve of free device blocks by swapping the
jobs with the largest estimated next scheduled time (ENST) to host memory, and prefetches
the smallest-ENST jobs back when there is room, never in a round that swapped out.
Recomputation is the fallback only when the host tier is full.

Departures from the paper, so that preemption never costs more than it gains (each one
measured in docs/overload.md): a job is demoted at the end of a quantum only if the
finished requests' output lengths say it will outlast a new job (``service.py``); a
promoted job keeps its level until it finishes; a job without KV starts only in free
blocks, while the started jobs (both tiers) fit the device pool outside the reserve and
number fewer than ``mlfq_max_started_factor x max_batch_size``. Its settings and their
config.pbtxt parameters: ``MLFQOptions``.

Priorities: within a queue, high-priority jobs go ahead of normal ones (each in their
order of arrival in the queue): they are tried first when the batch is filled, and a
high-priority job may evict a normal job of its own queue as it may a later job of it
(by swapping; recomputation stays for strictly lower queues). Levels, quanta, demotion
and promotion ignore priority. With every request normal nothing changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from ..request import Request
from .base import Plan, PolicyState, Scheduler
from .output import ScheduledRequest, SchedulerOutput
from .parameters import PolicyOptions, at_least, fraction, milliseconds, parameter, positive
from .registry import register_policy


@dataclass(eq=False)
class _Job:
    request: Request
    level: int
    seq: int  # order of arrival in its current level
    attained_s: float = 0.0
    # Most tokens ever in its cache: recomputing below this is redoing lost work, which
    # is not service (counting it would demote a job for work preemption took away).
    num_tokens_high_water: int = 0
    # In its queue by starvation promotion rather than by arrival or demotion.
    promoted: bool = False

    @property
    def key(self) -> tuple[int, bool, int]:
        """Priority: smaller runs first (high-priority requests first within a level)."""
        return (self.level, not self.request.is_high_priority, self.seq)


@dataclass(frozen=True)
class MLFQOptions(PolicyOptions):
    base_quantum_s: float = parameter(
        "mlfq_base_quantum_ms", 0.05, milliseconds, positive,
        "quantum of the top queue Q0; Qi's is base * ratio**i")
    quantum_ratio: float = parameter(
        "mlfq_quantum_ratio", 2.0, float, at_least(1), "growth of the quantum per level")
    num_queues: int = parameter("mlfq_num_queues", 6, int, at_least(1), "number of queues")
    starvation_threshold_s: float = parameter(
        "mlfq_starvation_threshold_ms", 2.0, milliseconds, positive,
        "a job idle this long returns to Q0 (and keeps it until it finishes)")
    max_started_factor: float = parameter(
        "mlfq_max_started_factor", 2.0, float, at_least(1),
        "new jobs start only while fewer than this many times max_batch_size jobs hold KV")
    kv_reserve_fraction: float = parameter(
        "kv_reserve_fraction", 0.05, float, fraction,
        "share of device KV blocks proactive offload keeps free for arrivals")


@register_policy("skip_join_mlfq")
class SkipJoinMLFQScheduler(Scheduler):
    requires_cost_model = True
    options_class = MLFQOptions
    options: MLFQOptions

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.cost_model is None:
            raise ValueError("skip_join_mlfq needs a prefill cost model")
        opts, max_batch_size = self.options, self.config.max_batch_size
        self.quanta_s = [opts.base_quantum_s * opts.quantum_ratio**i
                         for i in range(opts.num_queues)]
        self.reserve_blocks = int(opts.kv_reserve_fraction * self.block_manager.num_blocks)
        self.max_started_jobs = max(max_batch_size,
                                    int(opts.max_started_factor * max_batch_size))
        self._levels: list[dict[str, _Job]] = [{} for _ in self.quanta_s]
        self._jobs: dict[str, _Job] = {}
        # A dict, not a set: its order decides idle order, and string hashes vary between
        # processes (the simulator must replay identically).
        self._running: dict[str, None] = {}
        # Insertion order is idle order: the first entries have waited longest.
        self._idle_since: dict[str, float] = {}
        self._seq = itertools.count()
        self._num_high_jobs = 0  # jobs of high-priority requests
        self.num_promotions = self.num_demotions = self.num_demotions_declined = 0

    # -- bookkeeping ---------------------------------------------------------------------

    def level_of(self, request_id: str) -> int:
        return self._jobs[request_id].level

    def queue_lengths(self) -> list[int]:
        return [len(level) for level in self._levels]

    def _enqueue(self, request: Request, state: PolicyState | None) -> None:
        if state:  # moved here from another engine: its level and service go with it
            level = min(int(state["level"]), len(self.quanta_s) - 1)
            job = _Job(request, level, next(self._seq), float(state["attained_s"]),
                       int(state["num_tokens_high_water"]), bool(state["promoted"]))
        else:
            assert self.cost_model is not None
            t_init = self.cost_model.prefill_time_s(request.num_prompt_tokens)
            level = next((i for i, q in enumerate(self.quanta_s) if q >= t_init),
                         len(self.quanta_s) - 1)
            job = _Job(request, level, next(self._seq))
        self._jobs[request.request_id] = job
        self._levels[level][request.request_id] = job
        self._idle_since[request.request_id] = self.clock()
        self._num_high_jobs += request.is_high_priority

    def _export_state(self, request: Request) -> PolicyState:
        job = self._jobs[request.request_id]
        return {"level": job.level, "attained_s": job.attained_s,
                "num_tokens_high_water": job.num_tokens_high_water, "promoted": job.promoted}

    def _remove(self, request: Request) -> None:
        job = self._jobs.pop(request.request_id, None)
        if job is not None:
            del self._levels[job.level][request.request_id]
            self._num_high_jobs -= request.is_high_priority
        self._running.pop(request.request_id, None)
        self._idle_since.pop(request.request_id, None)

    def _move(self, job: _Job, level: int) -> None:
        request_id = job.request.request_id
        del self._levels[job.level][request_id]
        job.level, job.seq, job.attained_s = level, next(self._seq), 0.0
        job.promoted = False
        self._levels[level][request_id] = job

    def _priority_order(self) -> Iterator[_Job]:
        if not self._num_high_jobs:
            for level in self._levels:
                yield from level.values()
            return
        for level in self._levels:  # by ``_Job.key``: high-priority jobs first
            yield from (job for job in level.values() if job.request.is_high_priority)
            yield from (job for job in level.values() if not job.request.is_high_priority)

    def _promote_starved(self, now: float) -> None:
        threshold = self.options.starvation_threshold_s
        # At most a batch's worth per iteration: more could not run at once anyway, and
        # thousands starving together would otherwise stall one iteration.
        starved = list(itertools.islice(itertools.takewhile(
            lambda item: now - item[1] >= threshold, self._idle_since.items()),
            self.config.max_batch_size))
        for request_id, _ in starved:
            job = self._jobs[request_id]
            # Restart its idle clock, or it would be promoted again every iteration.
            del self._idle_since[request_id]
            self._idle_since[request_id] = now
            if job.promoted:
                continue  # already up: keep its place in the top queue
            self._move(job, 0)
            job.promoted = True
            self.num_promotions += 1

    def _enst_s(self, job: _Job, now: float) -> float:
        """Estimated next scheduled time: promotion or the higher queues' quanta, sooner."""
        idle_s = now - self._idle_since.get(job.request.request_id, now)
        t_promote = max(0.0, self.options.starvation_threshold_s - idle_s)
        ahead_s = sum(len(self._levels[i]) * self.quanta_s[i] for i in range(job.level))
        return min(t_promote, ahead_s / self.config.max_batch_size)

    # -- the plan ------------------------------------------------------------------------

    def _plan(self, plan: Plan) -> None:
        bm = self.block_manager
        now = self.clock()
        self._promote_starved(now)
        budget = self.config.max_num_batched_tokens

        # 1. Fill from the highest queue down until the batch, the budget or memory ends.
        #    Once a job without device KV cannot get blocks, no later job without KV may
        #    start (a stream of smaller arrivals would pass it forever): only jobs that
        #    hold KV in either tier are still tried, in priority order.
        blocked = False
        max_batch_size = self.config.max_batch_size
        num_selected = 0
        for job in self._priority_order():
            if num_selected >= max_batch_size or budget <= 0:
                break
            item = self._try_select(job, min(job.request.num_uncomputed_tokens, budget), plan)
            if item is not None:
                budget -= len(item.token_ids)
                num_selected += 1
            elif not bm.has_blocks(job.request.request_id):
                blocked = True
                break
        if blocked:
            holders = [self._jobs[r] for r in (*bm.device_owners(), *bm.host_owners())
                       if r not in plan.selected and r in self._jobs]
            for job in sorted(holders, key=lambda j: j.key):
                if len(plan.selected) >= self.config.max_batch_size or budget <= 0:
                    break
                if not bm.has_blocks(job.request.request_id) and not bm.is_on_host(
                        job.request.request_id):
                    continue  # recomputed while making room for a job ahead of it
                num_tokens = min(job.request.num_uncomputed_tokens, budget)
                if self._try_select(job, num_tokens, plan) is not None:
                    budget -= num_tokens

        # Never idle while jobs wait: with nothing selected, the top job may recompute
        # anyone (each job fits the pool alone, so this always makes progress).
        if not plan.selected and self._jobs:
            top = next(self._priority_order())
            self._try_select(top, min(top.request.num_uncomputed_tokens, budget), plan,
                             force=True)

        # 2. Proactive offload: keep the reserve free for arrivals.
        if bm.num_free_blocks < self.reserve_blocks:
            for job in sorted(self._resident_idle(plan), key=lambda j: -self._enst_s(j, now)):
                if bm.num_free_blocks + bm.num_pending_blocks >= self.reserve_blocks:
                    break
                if not self._swap_out(job.request, plan, reuse_now=False):
                    break  # host tier full: keep the rest resident
        # 3. Prefetch, never in a round that swapped out (no ping-pong).
        if not plan.swap_out:
            for request_id in sorted((r for r in bm.host_owners() if r in self._jobs),
                                     key=lambda r: self._enst_s(self._jobs[r], now)):
                needed = bm.num_host_blocks_of(request_id)
                if bm.num_free_blocks - needed < self.reserve_blocks:
                    break
                self._swap_in(self._jobs[request_id].request, plan)

        plan.preempted.extend(rid for rid in self._running if rid not in plan.selected)
        for request_id in plan.preempted:
            self._idle_since[request_id] = now
        for request_id in plan.selected:
            if request_id not in self._running:
                self._idle_since.pop(request_id, None)
        self._running = dict.fromkeys(plan.selected)

    def _try_select(
        self, job: _Job, num_tokens: int, plan: Plan, force: bool = False
    ) -> ScheduledRequest | None:
        """Give ``job`` blocks for ``num_tokens`` more tokens, evicting lower jobs if needed.

        A job that holds no KV (new, or recomputing) starts only in free blocks, only
        while fewer than ``max_started_jobs`` jobs hold KV, and only while the KV of every
        started job (both tiers) and its own fit in the device pool outside the reserve:
        it never evicts a started job, so arrivals cannot turn started work into swaps in
        the forward's path or into recomputation, nor grow the started set without
        bound (round robin over a backlog, worse mean latency than fcfs). The host
        tier absorbs the growth of started jobs and the reserve proactive offload keeps;
        it does not hold a backlog of started work that must come back through
        blocking swap-ins (docs/overload.md has the measurements).
        """
        bm = self.block_manager
        request = job.request
        request_id = request.request_id
        item = self._schedule_resident(request, num_tokens, plan)
        if item is not None:
            return item
        # Blocks on the host come back as part of the table: count the table once.
        needed = bm.num_blocks_needed(request_id, request.num_computed_tokens + num_tokens,
                                      request.hidden)
        starting = not force and not bm.has_blocks(request_id) and not bm.is_on_host(
            request_id)
        if starting and (bm.num_used_blocks + bm.num_used_host_blocks + needed
                         > bm.num_blocks - self.reserve_blocks):
            return None
        if starting and (len(bm.device_owners()) + len(bm.host_owners())
                         >= self.max_started_jobs):
            return None
        if needed > bm.num_free_blocks:
            if starting:
                return None
            if not self._evict_below(job, needed, plan, force):
                return None
        if bm.is_on_host(request_id):
            self._swap_in(request, plan)
        item = self._try_schedule(request, num_tokens, plan)
        assert item is not None, "blocks were made available above"
        return item

    def _evict_below(self, job: _Job, needed: int, plan: Plan, force: bool = False) -> bool:
        """Free device blocks held by lower-priority idle jobs until ``needed`` are free.

        Any lower job may be swapped out. Only a job of a strictly lower queue may lose
        its KV to recomputation, and not to a job that is up by starvation promotion:
        two jobs that take turns starving would otherwise undo each other's work on
        every turn (quadratic work, or none finishing when turns are short). ``force``
        lifts both limits (the batch would otherwise be empty).
        """
        bm = self.block_manager
        victims = sorted((v for v in self._resident_idle(plan)
                          if v is not job and (force or v.key > job.key)),
                         key=lambda v: v.key, reverse=True)
        blocks = {v.request.request_id: bm.num_device_blocks_of(v.request.request_id)
                  for v in victims}
        def recomputable(victim: _Job) -> bool:
            return force or (victim.level > job.level and not job.promoted)

        num_recomputable = sum(blocks[v.request.request_id] for v in victims if recomputable(v))
        num_swappable = min(bm.num_free_host_blocks, sum(
            blocks[v.request.request_id] for v in victims if not recomputable(v)))
        if bm.num_free_blocks + num_recomputable + num_swappable < needed:
            return False
        for victim in victims:
            if bm.num_free_blocks >= needed:
                break
            if not self._swap_out(victim.request, plan, reuse_now=True) and recomputable(victim):
                self._preempt_by_recompute(victim.request)  # host tier full
        return bm.num_free_blocks >= needed

    def _resident_idle(self, plan: Plan) -> list[_Job]:
        """Jobs holding device blocks that are not selected this round (requests being
        moved to another engine hold blocks too, but are no longer jobs here)."""
        return [self._jobs[r] for r in self.block_manager.device_owners()
                if r not in plan.selected and r in self._jobs]

    # -- results -------------------------------------------------------------------------

    def _account_service(self, output: SchedulerOutput, step_time_s: float) -> None:
        """Attained service and demotion; finished jobs are already gone.

        At the end of a quantum a job is demoted only if it is expected to run longer
        than a new job (``OutputLengthHistory``); otherwise it keeps its level and its
        place for another quantum. A job up by starvation promotion keeps its level until
        it finishes, so promotion cannot turn a backlog into round robin.
        """
        last_level = len(self.quanta_s) - 1
        jobs = self._jobs
        for item in output.scheduled:
            job = jobs.get(item.request_id)
            if job is None:
                continue
            context_len = item.start_position + len(item.token_ids)  # item.context_len
            if context_len <= job.num_tokens_high_water:
                continue  # recomputation of lost work
            job.num_tokens_high_water = context_len
            job.attained_s += step_time_s
            if (job.attained_s <= self.quanta_s[job.level] or job.level == last_level
                    or job.promoted):
                continue
            if job.level == 0 or self.output_lengths.expects_longer_than_new(
                    job.request.num_output_tokens):
                self._move(job, job.level + 1)
                self.num_demotions += 1
            else:
                job.attained_s = 0.0
                self.num_demotions_declined += 1


