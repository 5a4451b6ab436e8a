"""Measure this engine's prefill time against prompt length (the MLFQ's cost model)."""

from __future__ import annotations

import logging
import time

import torch

from ..core.block_manager import BlockManager
from ..core.cost_model import PrefillProfile
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
    states = {_PROFILE_ID: SamplingState.create(SamplingParams(max_tokens=1),
                                                runner.device)}
    points = []
    for num_tokens in usable:
        assert block_manager.allocate(_PROFILE_ID, num_tokens)
        item = ScheduledRequest(
            request_id=_PROFILE_ID,
            token_ids=tuple(i % vocab_size for i in range(num_tokens)),
            start_position=0,
            block_ids=tuple(block_manager.block_table(_PROFILE_ID)),
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
    logger.info("prefill profile: %s",
                ", ".join(f"{n} tokens {t * 1e3:.1f} ms" for n, t in points))
    return PrefillProfile(tuple(points))
