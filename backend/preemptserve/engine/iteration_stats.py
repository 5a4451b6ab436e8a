"""One record per engine iteration: what ran, how long it took, what was left.

With ``LLMEngine.record_iteration_stats`` on, the engine builds one after every ``step()``
(``LLMEngine.last_iteration``); with ``iteration_stats_path`` set, the serving loop turns
that on and appends each record as a JSON line (in the spirit
of TensorRT-LLM's per-iteration statistics). The batch fields are the simulator's
``BatchShape``, so ``bench profile --server`` fits its cost model to the server's own
iterations. Plain data, no torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from ..core.scheduler.output import (
    BatchShape,
    SchedulerOutput,
    batch_shape,
    hidden_recompute_blocks,
)


@dataclass(frozen=True)
class IterationStats:
    iteration: int
    timestamp: float  # wall clock (time.time()) at the start of the step
    start_s: float  # time.perf_counter() at the start of the step: differences are periods
    step_s: float  # schedule + swaps + forward + sampling + detokenisation
    num_scheduled: int
    num_prefill_tokens: int
    num_decode_tokens: int
    decode_context_tokens: int
    prefill_attention_tokens: int
    num_sampled_tokens: int
    hidden_recompute_blocks: int  # KV-sized blocks recomputed from hidden states
    num_preemptions: int  # requests that lost their place in this iteration
    num_swap_outs: int  # requests whose blocks moved to host memory
    num_swap_ins: int
    swap_out_blocks: int
    swap_in_blocks: int
    # After the step:
    num_unfinished: int  # requests still in the engine (0: the loop waits for arrivals)
    num_waiting: int
    num_running: int
    num_preempted: int
    num_blocks_used: int
    num_host_blocks_used: int

    @classmethod
    def of_step(
        cls,
        iteration: int,
        output: SchedulerOutput,
        timestamp: float,
        start_s: float,
        step_s: float,
        block_size: int,
        **after: int,
    ) -> IterationStats:
        shape = batch_shape(output)
        return cls(
            iteration=iteration,
            timestamp=timestamp,
            start_s=start_s,
            step_s=step_s,
            num_scheduled=len(output.scheduled),
            **shape._asdict(),
            hidden_recompute_blocks=hidden_recompute_blocks(output, block_size),
            num_preemptions=len(output.preempted_ids),
            num_swap_outs=len(output.swap_out),
            num_swap_ins=len(output.swap_in),
            swap_out_blocks=sum(s.num_blocks for s in output.swap_out),
            swap_in_blocks=sum(s.num_blocks for s in output.swap_in),
            **after,
        )

    @property
    def shape(self) -> BatchShape:
        return BatchShape(*(getattr(self, name) for name in BatchShape._fields))

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class IterationLog:
    """Appends ``IterationStats`` as JSON lines to a file (buffered; flushed when the
    engine goes idle and on close)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = self.path.open("a", encoding="utf-8")

    def write(self, stats: IterationStats) -> None:
        if self._file is not None:
            self._file.write(stats.to_json() + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def instance_log_path(path: str | Path, instance: int) -> str:
    """The iteration log of engine instance ``instance`` of a cluster whose model sets
    ``iteration_stats_path`` to ``path``: ``iters.jsonl`` -> ``iters-instance0.jsonl``
    ("" stays "": no log)."""
    if not str(path):
        return ""
    path = Path(path)
    return str(path.with_name(f"{path.stem}-instance{instance}{path.suffix}"))


def read_iteration_log(path: str | Path) -> Iterator[IterationStats]:
    """The records of an iteration-stats file, in order (fields it does not know are an
    error: the file belongs to another version)."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record: dict[str, Any] = json.loads(line)
                yield IterationStats(**record)


def read_log_when_idle(path: str | Path, timeout_s: float = 10.0) -> list[IterationStats]:
    """A live server's log once its last record shows an idle engine (the log is flushed
    when the engine goes idle); what is there after ``timeout_s`` otherwise."""
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(read_iteration_log(path)) if path.exists() else []
        if (records and not records[-1].num_unfinished) or time.monotonic() >= deadline:
            return records
        time.sleep(0.2)
