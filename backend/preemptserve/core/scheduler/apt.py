"""``apt``: Apt-Serve's adaptive scheduling on a hybrid KV/hidden cache.

Every iteration is either a *prefill step* (requests without a complete prefill) or a
*decode step* (one token for requests whose prefill is done), as in Apt-Serve:

* a request's *pending time* ``p`` is the time since its last token (since arrival before
  the first); its value is ``p``, or ``p * LOST_VALUE_SCALE`` once it has missed its SLO
  (TTFT over its TTFT SLO, or more time-between-tokens misses than its P99 allows): the
  SLO-aware fallback serves such requests only with what is left;
* decode step if the decode candidates' summed value exceeds the prefill candidates', or
  if no prefill candidate fits; otherwise a prefill step;
* the step's batch is chosen by the greedy knapsack of ``knapsack.py`` over device blocks.
  A request with no cache may join in KV mode (``m`` blocks, value ``p``) or in hidden mode
  (``ceil(m/2)`` blocks, value ``p - U * c * m``: ``U`` requests wait for the slower step,
  ``c`` the profiled recompute seconds per block of context); a request with a cache keeps
  its mode (switching means recomputing, which only a preemption by recomputation does).

Beyond the paper's vLLM prototype, a request that loses its place keeps its cache on the
device while it fits, and is swapped to the host tier (or, host full, preempted by
recomputation) only when a chosen request needs its blocks.

Departures measured in docs/overload.md: pending time is floored above zero (a request
served at this instant stays a candidate); decode steps weigh resident decodes and bring
swapped-out ones back only into free blocks; a request without a cache is admitted only
while the started requests (both tiers) number at most a batch and fit the device pool;
a prefill step carries the resident decodes that fit; the hidden option charges its
slowdown over the request's expected remaining output and is offered only when it gains
more than it costs.

Priorities (values are unchanged, so the knapsack still weighs pending time): a request
that must lose its device cache for another is a normal-priority one while any is
there (then the least valuable); high-priority requests that have not started are
always among the new requests the prefill knapsack weighs; and among the chosen,
high-priority requests take the token budget first (after unfinished prefills). With
every request normal nothing changes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..request import CacheMode, Request
from .arrivals import WaitingArrivals
from .base import Plan, PolicyState, Scheduler
from .knapsack import Option, choose
from .output import ScheduledRequest
from .parameters import PolicyOptions, milliseconds, parameter, positive
from .registry import register_policy
from .slo import LOST_VALUE_SCALE, SLOTracker

# New requests the prefill knapsack weighs per batch slot left for them.
NEW_CANDIDATES_PER_SLOT = 4




@dataclass(frozen=True)
class AptOptions(PolicyOptions):
    # A request meets its SLO if its time to first token and its P99 time between tokens
    # are below these; requests may set their own (request parameters of the same names).
    ttft_slo_s: float = parameter("ttft_slo_ms", 2.0, milliseconds, positive,
                                  "time-to-first-token objective")
    tbt_slo_s: float = parameter("tbt_slo_ms", 0.5, milliseconds, positive,
                                 "P99 time-between-tokens objective")


@register_policy("apt")
class AptScheduler(Scheduler):
    requires_cost_model = True
    requires_recompute_cost = True
    options_class = AptOptions
    options: AptOptions

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        recompute = getattr(self.cost_model, "hidden_recompute_s_per_block", None)
        if self.block_manager.supports_hidden and recompute is None:
            raise ValueError("apt needs the profiled hidden-cache recompute cost per block")
        self.recompute_s_per_block = recompute or 0.0
        self._slo = SLOTracker(self.options.ttft_slo_s, self.options.tbt_slo_s)
        self.num_prefill_steps = self.num_decode_steps = 0
        self.last_num_candidates = 0  # requests the last knapsack weighed
        self.num_mode_switches = 0
        self._num_decodes = 0  # decodable requests in the step being planned
        # Resident requests outside the step's choice, most valuable first (popped from
        # the end): built on the first eviction of a step.
        self._victims: list[str] | None = None
        # Requests that have never run, apart (their values are summed without a pass
        # over them), and the ones that have, in the order they started.
        self._arrivals = WaitingArrivals()
        self._started: dict[str, Request] = {}
        # The high-priority ones among the arrivals, in arrival order.
        self._high_arrivals: dict[str, Request] = {}

    # -- bookkeeping ---------------------------------------------------------------------

    def _enqueue(self, request: Request, state: PolicyState | None) -> None:
        now = self.clock()
        self._slo.add(request, now, state)
        if request.first_scheduled_time_s is None:
            arrival_s = self._slo.arrival_s(request.request_id)
            self._arrivals.add(request, arrival_s, arrival_s + self._slo.ttft_slo_s(request))
            if request.is_high_priority:
                self._high_arrivals[request.request_id] = request
        else:
            self._started[request.request_id] = request

    def _export_state(self, request: Request) -> PolicyState:
        return self._slo.export(request.request_id, self.clock())

    def _remove(self, request: Request) -> None:
        request_id = request.request_id
        self._arrivals.remove(request_id)
        self._started.pop(request_id, None)
        self._slo.remove(request_id)
        if self._high_arrivals:
            self._high_arrivals.pop(request_id, None)

    def value(self, request: Request, now: float) -> float:
        """Pending time, scaled down once the request can no longer meet its SLO."""
        return self._slo.value(request, now)

    def update_from_output(self, output, sampled_token_ids, step_time_s=None,  # type: ignore[no-untyped-def]
                           stop_hits=()):
        finished = super().update_from_output(output, sampled_token_ids, step_time_s,
                                              stop_hits)
        now = self.clock()
        requests, record_token = self.requests, self._slo.record_token
        for request_id in sampled_token_ids:
            request = requests.get(request_id)
            if request is not None:  # else finished in this step
                record_token(request, now)
        return finished

    # -- the plan ------------------------------------------------------------------------

    def _plan(self, plan: Plan) -> None:
        bm = self.block_manager
        now = self.clock()
        values: dict[str, float] = {}
        decodes: list[Request] = []
        prefills: list[Request] = []
        decode_value = prefill_value = 0.0
        # One pass over the requests that have run: keep it lean. Those that have not are
        # summed without a pass, and only the most valuable of them are candidates.
        self._arrivals.expire(now)
        value_of = self._slo.value  # ``value``, without a call layer per request
        for request_id, request in self._started.items():
            value = values[request_id] = value_of(request, now)
            computed = request.num_computed_tokens
            if computed and computed + 1 == (len(request.prompt_token_ids)
                                             + len(request.output_token_ids)):
                decodes.append(request)
                decode_value += value
            else:
                prefills.append(request)
                prefill_value += value
        prefill_value += self._arrivals.summed_pending_s(now, LOST_VALUE_SCALE)
        # At most a batch of requests hold a cache, so at most that many new ones can
        # start: the knapsack weighs the most valuable new ones, a few times the room.
        room = self.config.max_batch_size - len(bm.device_owners()) - len(bm.host_owners())
        if room > 0 or not (decodes or prefills):
            for request in self._new_candidates(NEW_CANDIDATES_PER_SLOT * max(room, 1)):
                values[request.request_id] = self.value(request, now)
                prefills.append(request)
        self._num_decodes = len(decodes)
        decode_first = decode_value > prefill_value
        for step in ((self._decode_step, self._prefill_step) if decode_first
                     else (self._prefill_step, self._decode_step)):
            step(decodes if step == self._decode_step else prefills, values, plan)
            if plan.selected:
                break
        if not plan.selected and self.requests:
            self._force_one(decodes or prefills, values, plan)
        elif not decode_first:
            # Apt-Serve's prefill steps stall every decode (with long prompts a large
            # share of the throughput; docs/overload.md). Resident decodes ride along
            # instead, as chunked-prefill engines run them.
            self._carry_resident_decodes(decodes, plan)

        for request_id in plan.selected:
            if request_id in self._arrivals:
                self._arrivals.remove(request_id)
                self._started[request_id] = self.requests[request_id]
                if self._high_arrivals:
                    self._high_arrivals.pop(request_id, None)

    def _new_candidates(self, num_requests: int) -> list[Request]:
        """Up to ``num_requests`` never-started requests for the prefill knapsack: the
        high-priority ones first (in arrival order), then the most valuable others."""
        if not self._high_arrivals:
            return list(self._arrivals.most_valuable(num_requests))
        chosen = list(itertools.islice(self._high_arrivals.values(), num_requests))
        if len(chosen) < num_requests:
            # Every high-priority arrival is in ``chosen``: skipping them leaves enough.
            rest = self._arrivals.most_valuable(num_requests + len(chosen))
            chosen.extend(itertools.islice(
                (r for r in rest if not r.is_high_priority), num_requests - len(chosen)))
        return chosen

    def _options(self, request: Request, value: float, num_decodes: int) -> list[Option]:
        """Ways to serve ``request``: its current mode if it has a cache, else KV or hidden."""
        bm = self.block_manager
        request_id = request.request_id
        num_tokens = request.num_tokens
        kv_blocks = bm.blocks_for_tokens(num_tokens)
        has_cache = bm.has_blocks(request_id) or bm.is_on_host(request_id)
        if (has_cache and not request.hidden) or not bm.supports_hidden:
            return [Option(CacheMode.KV, kv_blocks, value)]
        # U: the decode batch a hidden request slows down, itself included.
        penalty = min(num_decodes + 1, self.config.max_batch_size) * (
            self.recompute_s_per_block * kv_blocks)
        # The slowdown lasts as long as the request decodes, not one step: charged over
        # its expected remaining output (by the finished requests' lengths; one step
        # while fewer than min_samples are known, as in the paper).
        remaining = self.output_lengths.mean_residual_tokens(request.num_output_tokens) if (
            len(self.output_lengths) >= self.output_lengths.min_samples) else None
        penalty *= max(1.0, remaining or 1.0)
        hidden = Option(CacheMode.HIDDEN, bm.blocks_for_tokens(num_tokens, True),
                        max(value - penalty, value * LOST_VALUE_SCALE))
        if has_cache:
            return [hidden]
        kv = Option(CacheMode.KV, kv_blocks, value)
        # Hidden mode costs the other decodes more than it gains this request: not offered
        # (the paper floors it at the lost value, so it was taken whenever K/V did not fit).
        return [kv, hidden] if value > penalty else [kv]

    def _decode_step(self, decodes: list[Request], values: dict[str, float],
                     plan: Plan) -> None:
        """One token for the most valuable decodable requests that fit the device pool."""
        bm = self.block_manager
        if not decodes:
            return
        self._victims = None
        if len(decodes) <= self.config.max_batch_size and self._all_fit(decodes):
            # Memory does not bind: the knapsack would choose everyone.
            self.last_num_candidates = len(decodes)
            for request in decodes:
                self._admit(request, 1, plan, set(), values)
            self.num_decode_steps += 1
            return
        # The knapsack weighs the decodes holding device blocks; a swapped-out decode comes
        # back only into blocks left free, never by evicting a resident one. Pending-time
        # values otherwise rotate the batch (whoever sat out the last step is now the most
        # valuable), and every rotation is a swap out and a swap in (docs/overload.md).
        resident = [r for r in decodes if bm.has_blocks(r.request_id)]
        swapped = [r for r in decodes if not bm.has_blocks(r.request_id)]
        resident_ids = {r.request_id for r in resident}
        # Blocks held by unfinished prefills stay theirs in a decode step.
        capacity = bm.num_blocks - sum(bm.num_device_blocks_of(rid)
                                       for rid in bm.device_owners() if rid not in resident_ids)
        candidates = {r.request_id: self._options(r, values[r.request_id], len(decodes))
                      for r in resident}
        selection = choose(candidates, capacity)
        self.last_num_candidates = len(candidates)
        chosen = sorted(selection.chosen.items(),
                        key=lambda kv: -kv[1].value / max(kv[1].num_blocks, 1))
        chosen = chosen[:self.config.max_batch_size]
        keep = {rid for rid, _ in chosen}
        for request_id, _ in chosen:
            self._admit(self.requests[request_id], 1, plan, keep, values)
        for request in sorted(swapped, key=lambda r: -values[r.request_id]):
            if len(plan.selected) >= self.config.max_batch_size:
                break
            request_id = request.request_id
            needed = bm.num_blocks_needed(request_id, request.num_tokens, request.hidden)
            if needed <= bm.num_free_blocks:
                self._admit(request, 1, plan, set(plan.selected) | {request_id}, values)
        self.num_decode_steps += bool(plan.selected)

    def _carry_resident_decodes(self, decodes: list[Request], plan: Plan) -> None:
        """A prefill step also carries the decodes that hold their cache on the device and
        fit the batch, the token budget and the free blocks (nobody is evicted for them).
        """
        budget = self.config.max_num_batched_tokens - sum(
            item.num_tokens for item in plan.selected.values())
        for request in decodes:
            if len(plan.selected) >= self.config.max_batch_size or budget <= 0:
                break
            if request.request_id in plan.selected:
                continue
            if self._schedule_resident(request, 1, plan) is not None:
                budget -= 1

    def _all_fit(self, decodes: list[Request]) -> bool:
        """Every decode is resident and the free blocks cover their next token."""
        bm = self.block_manager
        needed = 0
        for request in decodes:
            request_id = request.request_id
            if not bm.has_blocks(request_id):
                return False
            needed += bm.num_blocks_needed(request_id, request.num_tokens, request.hidden)
        return needed <= bm.num_free_blocks

    def _prefill_step(self, prefills: list[Request], values: dict[str, float],
                      plan: Plan) -> None:
        """Prefill chunks for the most valuable requests that fit the free device blocks."""
        bm = self.block_manager
        if not prefills:
            return
        num_decodes = self._num_decodes
        resident_decodes = sum(1 for rid in bm.device_owners() if rid in self.requests
                               and self.requests[rid].num_uncomputed_tokens == 1)
        # Resident decoders keep room to grow by a block each; their blocks are not ours.
        capacity = bm.num_free_blocks - resident_decodes
        # A request without a cache starts only while started work (both tiers) and its
        # own blocks fit the device pool: blocks held on the host count too, so that
        # admitting prefills never leaves a backlog of started requests that only rotate
        # through the device by swapping (docs/overload.md).
        start_capacity = (bm.num_blocks - bm.num_used_blocks - bm.num_used_host_blocks
                          - resident_decodes)
        candidates = {}
        for request in prefills:
            request_id = request.request_id
            options = self._options(request, values[request_id], num_decodes)
            held = bm.num_device_blocks_of(request_id)
            candidates[request_id] = [Option(o.mode, o.num_blocks - held, o.value)
                                      for o in options]
        selection = choose(candidates, capacity)
        self.last_num_candidates = len(candidates)
        # Unfinished prefills first (their blocks are spent), then by value.
        chosen = sorted(selection.chosen.items(), key=lambda kv: (
            not self.requests[kv[0]].num_computed_tokens,
            not self.requests[kv[0]].is_high_priority, -kv[1].value))
        budget = self.config.max_num_batched_tokens
        # Started requests in either tier: no more than a batch's worth, so that decode
        # steps do not rotate a larger started set through the batch by pending time.
        num_resident = len(bm.device_owners()) + len(bm.host_owners())
        keep = {rid for rid, _ in chosen}
        self._victims = None
        for request_id, option in chosen:
            request = self.requests[request_id]
            is_new = not bm.has_blocks(request_id) and not bm.is_on_host(request_id)
            if budget <= 0:
                break
            if is_new:
                if (num_resident >= self.config.max_batch_size
                        or option.num_blocks > start_capacity):
                    continue
                num_resident += 1
                start_capacity -= option.num_blocks
                self._set_mode(request, option.mode)
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if self._admit(request, num_tokens, plan, keep, values) is not None:
                budget -= num_tokens
        self.num_prefill_steps += bool(plan.selected)

    def _force_one(self, candidates: list[Request], values: dict[str, float],
                   plan: Plan) -> None:
        """Nothing fit: run the most valuable request alone, evicting whoever is in the way.

        Every request fits the pool alone (checked on arrival), so this progresses unless
        blocks are held outside this policy's requests (a reservation for a request moving
        in, a request stopped for its move out): then nothing runs until those moves end.
        """
        request = max(candidates, key=lambda r: values[r.request_id])
        if not self.block_manager.has_blocks(request.request_id) and not (
                self.block_manager.is_on_host(request.request_id)):
            self._set_mode(request, CacheMode.KV)
        num_tokens = min(request.num_uncomputed_tokens, self.config.max_num_batched_tokens)
        self._victims = None
        self._admit(request, num_tokens, plan, {request.request_id}, values, force=True)

    def _set_mode(self, request: Request, mode: object) -> None:
        assert isinstance(mode, CacheMode)
        if mode is not request.cache_mode and request.num_preemptions:
            self.num_mode_switches += 1  # the switch rides on its recomputation
        request.cache_mode = mode

    def _admit(
        self, request: Request, num_tokens: int, plan: Plan, keep: set[str],
        values: dict[str, float], force: bool = False,
    ) -> ScheduledRequest | None:
        """Blocks (evicting requests outside ``keep``), swap-in if needed, then schedule."""
        bm = self.block_manager
        request_id = request.request_id
        item = self._schedule_resident(request, num_tokens, plan)
        if item is not None:
            return item
        needed = bm.num_blocks_needed(request_id, request.num_computed_tokens + num_tokens,
                                      request.hidden)
        if needed > bm.num_free_blocks:
            if self._victims is None:
                # Popped from the end: normal-priority requests first, least valuable first.
                self._victims = sorted((rid for rid in bm.device_owners()
                                        if rid not in keep and rid in values),
                                      key=lambda rid: (self.requests[rid].is_high_priority,
                                                       values[rid]), reverse=True)
            while bm.num_free_blocks < needed and self._victims:
                victim_id = self._victims.pop()
                if bm.has_blocks(victim_id) and victim_id not in plan.selected:
                    self._evict(self.requests[victim_id], plan)
            if bm.num_free_blocks < needed:
                if not force or self._blocks_held_elsewhere():
                    return None
                raise AssertionError("forced admission found no room")
        if bm.is_on_host(request_id):
            self._swap_in(request, plan)
        return self._try_schedule(request, num_tokens, plan)

    def _blocks_held_elsewhere(self) -> bool:
        """Whether device blocks are held by no request of this policy: reserved for a
        request moving in, or kept by one stopped for its move out (``detach``)."""
        bm = self.block_manager
        return bm.num_used_blocks > sum(bm.num_device_blocks_of(r) for r in self.requests)

    def _evict(self, victim: Request, plan: Plan) -> None:
        """Swap ``victim``'s cache to the host tier, or drop it (recomputation) if full.

        A request left out of one step keeps its cache and its place: only one that loses
        its device cache (here) counts as preempted.
        """
        plan.preempted.append(victim.request_id)
        if not self._swap_out(victim, plan, reuse_now=True):
            self._preempt_by_recompute(victim)
