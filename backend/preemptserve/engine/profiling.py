"""Measure this engine's costs for the policies' cost models.

The prefill time against prompt length (skip-join MLFQ), and the extra decode time of the
hidden-cache mode per block of context (Apt-Serve's recompute constant).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from itertools import combinations
from pathlib import Path

import torch

from ..core.block_manager import BlockManager
from ..core.cost_model import CostModel, PrefillProfile
from ..core.request import SamplingParams
from ..core.scheduler import ScheduledRequest, SchedulerOutput
from .executor import Executor
from .sampler import SamplingState

logger = logging.getLogger(__name__)

PROFILE_LENGTHS = (16, 64, 256, 1024)
_PROFILE_ID = "__prefill_profile__"


def measure_prefill_profile(
    runner: Executor,
    block_manager: BlockManager,
    max_tokens: int,
    vocab_size: int,
    lengths: tuple[int, ...] = PROFILE_LENGTHS,
    repeats: int = 2,
) -> PrefillProfile:
    """Time one prefill iteration per length (best of ``repeats``) on the real model.

    Runs before serving starts; borrows blocks from the pool and gives them back.
    """
    capacity = block_manager.num_free_blocks * block_manager.block_size
    usable = [n for n in lengths if n <= min(max_tokens, capacity)]
    if len(usable) < 2:
        usable = sorted({max(1, max_tokens // 4), max_tokens})
    states = {_PROFILE_ID: SamplingState.create(SamplingParams(max_tokens=1), runner.device)}
    points = []
    for num_tokens in usable:
        allocated = block_manager.allocate(_PROFILE_ID, num_tokens)
        if not allocated:
            raise RuntimeError(
                f"prefill profile: no room for {num_tokens} tokens "
                f"({block_manager.num_free_blocks} blocks free)")
        item = ScheduledRequest(
            request_id=_PROFILE_ID,
            token_ids=tuple(i % vocab_size for i in range(num_tokens)),
            start_position=0,
            block_ids=block_manager.block_ids(_PROFILE_ID),
            sample=True,
        )
        output = SchedulerOutput(step_id=0, scheduled=(item,))
        best_s = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            runner.execute(output, states)
            if runner.device.type == "cuda":
                torch.cuda.synchronize(runner.device)
            best_s = min(best_s, time.perf_counter() - start)
        block_manager.free(_PROFILE_ID)
        points.append((num_tokens, best_s))
    logger.info("prefill profile: %s", ", ".join(f"{n} tokens {t * 1e3:.1f} ms" for n, t in points))
    return PrefillProfile(tuple(points))


HIDDEN_PROFILE_CONTEXT_LENS = (64, 128, 256, 512, 1024, 2048)
_HIDDEN_PROFILE_ID = "__hidden_profile__"


def measure_hidden_recompute_cost(
    runner: Executor,
    block_manager: BlockManager,
    max_context_len: int,
    context_lens: tuple[int, ...] = HIDDEN_PROFILE_CONTEXT_LENS,
    batch_size: int = 4,
    repeats: int = 5,
    max_step_s: float = 0.1,
) -> float:
    """Extra decode-step seconds per KV-mode block of context recomputed in hidden mode.

    Apt-Serve's constant ``c``: a request holding ``m`` KV blocks' worth of context slows
    every decode step it joins by about ``c * m`` seconds when it runs in hidden mode.
    For each context length the same decode step of ``batch_size`` requests is timed in KV
    mode and in hidden mode, ``repeats`` times each, the two modes alternating. Each mode's
    time is its fastest repeat: other work on a shared machine only ever adds time, and
    on a loaded CPU it adds far more than the recompute costs at short contexts (a
    median let 100 ms bursts through). The differences are fitted against the batch's KV
    blocks of context by the median of pairwise slopes (Theil-Sen), which shrugs off one
    noisy length; if that is not positive, the median of the per-block differences is
    used (never below 0).
    Lengths run shortest first; once four are measured, longer ones are skipped when a
    hidden-mode step already took ``max_step_s`` (this bounds startup on a CPU, where the
    recompute is compute-bound, and leaves a GPU all its lengths).
    Runs before serving starts; borrows blocks from the pool and gives them all back.
    Raises ``ValueError`` if the cache has no hidden mode or the pool is too small.
    """
    if not block_manager.supports_hidden:
        raise ValueError("this cache has no hidden-cache mode")

    def blocks_needed(length: int) -> int:  # both modes' batches, allocated side by side
        return batch_size * (
            block_manager.blocks_for_tokens(length)
            + block_manager.blocks_for_tokens(length, hidden=True)
        )

    usable = sorted(
        n
        for n in context_lens
        if 2 <= n <= max_context_len and blocks_needed(n) <= block_manager.num_free_blocks
    )
    if len(usable) < 2:
        longest = max_context_len
        while longest > 2 and blocks_needed(longest) > block_manager.num_free_blocks:
            longest //= 2
        usable = sorted({n for n in (longest // 4, longest // 2, longest) if n >= 2})
        if len(usable) < 2:
            raise ValueError("the KV pool is too small to measure the hidden recompute cost")
    points = []
    for length in usable:
        outputs = {
            hidden: _decode_batch(block_manager, length, batch_size, hidden)
            for hidden in (False, True)
        }
        try:
            times_s: dict[bool, list[float]] = {False: [], True: []}
            for repeat in range(repeats + 1):
                for hidden, output in outputs.items():
                    elapsed_s = _time_step(runner, output)
                    if repeat:  # the first round warms up both modes
                        times_s[hidden].append(elapsed_s)
        finally:
            for output in outputs.values():
                for item in output.scheduled:
                    block_manager.free(item.request_id)
        hidden_step_s = min(times_s[True])
        extra_s = hidden_step_s - min(times_s[False])
        points.append((batch_size * block_manager.blocks_for_tokens(length), extra_s))
        if len(points) >= 4 and hidden_step_s >= max_step_s:
            break
    slopes = [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in combinations(points, 2) if x1 != x0]
    cost_s = statistics.median(slopes) if slopes else math.nan
    if not cost_s > 0 or not math.isfinite(cost_s):
        # Noise swamped the growth with length: fall back to the median cost per block.
        cost_s = statistics.median(y / x for x, y in points)
        logger.warning(
            "hidden recompute cost: no growth with context measured (%s); "
            "using the median cost per block",
            points,
        )
    logger.info(
        "hidden recompute cost: %.3g us per KV block of context (%s)",
        cost_s * 1e6,
        ", ".join(f"{x} blocks +{y * 1e3:.2f} ms" for x, y in points),
    )
    return max(cost_s, 0.0)


def _decode_batch(
    block_manager: BlockManager, context_len: int, batch_size: int, hidden: bool
) -> SchedulerOutput:
    """One decode step of ``batch_size`` requests at ``context_len`` tokens (no sampling)."""
    items = []
    for index in range(batch_size):
        request_id = f"{_HIDDEN_PROFILE_ID}{'h' if hidden else 'k'}{index}"
        allocated = block_manager.allocate(request_id, context_len, hidden)
        if not allocated:
            for item in items:  # give back this batch's blocks before failing
                block_manager.free(item.request_id)
            raise RuntimeError(
                f"hidden recompute profile: no room for a {'hidden' if hidden else 'KV'}-mode "
                f"context of {context_len} tokens ({block_manager.num_free_blocks} blocks free)")
        items.append(
            ScheduledRequest(
                request_id=request_id,
                token_ids=(1,),
                start_position=context_len - 1,
                block_ids=block_manager.block_ids(request_id),
                sample=False,
                hidden=hidden,
            )
        )
    return SchedulerOutput(step_id=0, scheduled=tuple(items))


def _time_step(runner: Executor, output: SchedulerOutput) -> float:
    start = time.perf_counter()
    runner.execute(output, {})
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - start


def load_profile_file(path: str | Path) -> CostModel:
    """The profile a ``prefill_profile_path`` names: a prefill profile (``prefill_points``,
    as ``PrefillProfile.save`` writes), or a cost model written by ``python -m
    preemptserve.bench profile``. With the latter, the server's policies weigh prefill
    times and the hidden recompute cost exactly as they do in the simulator fed that file.
    """
    if "prefill_points" in json.loads(Path(path).read_text()):
        return PrefillProfile.load(path)
    from ..sim.cost_model import IterationCostModel  # plain data, no torch

    return IterationCostModel.load(path)
