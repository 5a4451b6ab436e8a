"""Shared by the cluster tests: the instances' engine configuration, requests, and a
response collector."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import SamplingParams
from preemptserve.engine.kv_cache import bytes_per_block
from preemptserve.engine.outputs import RequestOutput
from preemptserve.model.args import LlamaArgs

BLOCK_SIZE = 8
NUM_BLOCKS = 48  # per instance: 384 tokens
PROMPT = "Once upon a time, in a land far away, there lived"  # 20 tokens: 3 blocks
GREEDY = SamplingParams(max_tokens=60, min_length=60, temperature=0.0)
# top_k set: with neither top_k nor top_p, temperature 1 would still be greedy.
SEEDED = SamplingParams(max_tokens=60, min_length=60, temperature=1.0, top_k=40, seed=7)


def engine_config(model_dir: Path) -> EngineConfig:
    """fcfs on the CPU, fp32, ``NUM_BLOCKS`` blocks of ``BLOCK_SIZE`` tokens."""
    block = bytes_per_block(LlamaArgs.from_model_dir(model_dir), BLOCK_SIZE, torch.float32)
    return EngineConfig(model_dir=str(model_dir), device="cpu",
                        scheduler=SchedulerConfig(policy="fcfs", max_batch_size=4,
                                                  max_num_batched_tokens=64),
                        cache=CacheConfig(kv_cache_bytes=NUM_BLOCKS * block,
                                          block_size=BLOCK_SIZE))


class Collector:
    """A request's response callback: every (output, error) it got, in order."""

    def __init__(self) -> None:
        self.outputs: list[tuple[RequestOutput, str | None]] = []
        self.done = threading.Event()
        self._cond = threading.Condition()

    def __call__(self, output: RequestOutput, error: str | None) -> None:
        with self._cond:
            self.outputs.append((output, error))
            self._cond.notify_all()
        if output.finished:
            self.done.set()

    def wait_for(self, num_outputs: int, timeout_s: float = 60.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.outputs) >= num_outputs, timeout_s), \
                f"{len(self.outputs)} outputs after {timeout_s} s, expected {num_outputs}"

    def wait_done(self, timeout_s: float = 60.0) -> tuple[RequestOutput, str | None]:
        assert self.done.wait(timeout_s), f"not finished after {timeout_s} s"
        return self.outputs[-1]

    @property
    def text(self) -> str:
        return "".join(output.text for output, _ in self.outputs)

    @property
    def numbers(self) -> list[int]:
        """``num_output_tokens`` of each output carrying tokens, in delivery order."""
        return [output.num_output_tokens for output, _ in self.outputs if output.token_ids]

    @property
    def finals(self) -> list[tuple[RequestOutput, str | None]]:
        return [(output, error) for output, error in self.outputs if output.finished]


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)
