"""The driver of tensor-parallel ranks: rank 0 lives in this process, ranks 1.. are workers.

Rank 0 (this process: the engine, inside the Triton model) schedules once per iteration
and sends the plan, a pickled ``SchedulerOutput``, to every worker over its own pipe
(plain data; a pipe, not a collective, so that idle workers can wait for the next plan
without any timeout, and a dead peer shows up as a broken pipe). Then every rank runs
the plan's swaps on its own KV slices and the forward on its own heads; the model's
all-reduces (gloo on CPU, NCCL on CUDA) keep them in lock step. Only rank 0 samples.

Faults: a monitor thread waits on the workers' process sentinels; a step that fails
(broken pipe, a collective that errors or times out) fails the executor too. After a
failure every step raises ``RankFailure`` and the remaining workers are stopped: the
engine cannot continue with a missing shard. Workers stop when ``shutdown()`` tells
them, or on their own when this process dies (see ``tp_worker``).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import pickle
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from ..core.scheduler import SchedulerOutput
from ..model.parallel import TensorParallel
from .executor import ShardSpec, build_shard, run_step
from .sampler import SamplingState
from .tp_worker import init_process_group, worker_main

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 5.0


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or a step across ranks failed: no more steps."""


@dataclass
class PlanStats:
    """Rank 0's cost of sending plans: pickling plus writing to every worker's pipe.

    ``send_s`` is wall time; ``send_cpu_s`` the sending thread's CPU time (without the
    time it waits while a woken worker takes its core).
    """

    num_plans: int = 0
    num_bytes: int = 0
    send_s: float = 0.0
    send_cpu_s: float = 0.0


@dataclass
class _Worker:
    rank: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection


class TensorParallelExecutor:
    def __init__(self, spec: ShardSpec, world_size: int) -> None:
        self.world_size = world_size
        self.device = torch.device(spec.device)
        self.plan_stats = PlanStats()
        self._failure: str | None = None
        self._closed = False
        self._workers: list[_Worker] = []
        # Serialises reaping: two threads waiting on one child can lose its exit code.
        self._reap_lock = threading.RLock()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        # On the CPU the ranks share the cores: each gets its part of this process's threads.
        num_threads = 0
        self._saved_num_threads = torch.get_num_threads()
        if self.device.type == "cpu":
            num_threads = max(1, torch.get_num_threads() // world_size)
            torch.set_num_threads(num_threads)
        context = torch_mp.get_context("spawn")
        try:
            for rank in range(1, world_size):
                conn, child_conn = context.Pipe()
                process = context.Process(
                    target=worker_main,
                    name=f"preemptserve-tp-rank{rank}",
                    daemon=True,
                    args=(
                        rank,
                        world_size,
                        _spec_for_rank(spec, rank),
                        backend,
                        init_method,
                        child_conn,
                        num_threads,
                    ),
                )
                process.start()
                child_conn.close()
                self._workers.append(_Worker(rank, process, conn))
            # Rank 0 loads its own shard while the workers load theirs.
            self.shard = build_shard(spec, TensorParallel(0, world_size))
            self._wait_loaded()
            init_process_group(backend, init_method, 0, world_size)
        except BaseException:
            self._stop_workers(graceful=False)
            torch.set_num_threads(self._saved_num_threads)
            raise
        self._wake_r, self._wake_w = context.Pipe(duplex=False)
        self._monitor = threading.Thread(target=self._watch, name="tp-monitor", daemon=True)
        self._monitor.start()
        logger.info(
            "tensor parallel: %d ranks (%s), worker pids %s, %d threads each",
            world_size,
            backend,
            [w.process.pid for w in self._workers],
            num_threads or torch.get_num_threads(),
        )

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def execute(
        self, output: SchedulerOutput, states: Mapping[str, SamplingState]
    ) -> dict[str, int]:
        if self._failure is not None:
            raise RankFailure(self._failure)
        try:
            self._send_plan(output)
            return run_step(self.shard, output, states)
        except Exception as exc:
            # The ranks are out of step now (or one is gone): the group cannot recover.
            self._fail(
                self._dead_worker_reason(wait_s=1.0)
                or f"a tensor-parallel step failed: {type(exc).__name__}: {exc}"
            )
            raise RankFailure(self._failure) from exc

    def shutdown(self) -> None:
        """Stop the workers (asked first, then killed) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        self._wake_w.send_bytes(b"x")
        self._stop_workers(graceful=self._failure is None)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._saved_num_threads)

    # -- plans -----------------------------------------------------------------------------

    def _send_plan(self, output: SchedulerOutput | None) -> None:
        start, start_cpu = time.perf_counter(), time.thread_time()
        data = pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL)
        for worker in self._workers:
            worker.conn.send_bytes(data)
        self.plan_stats.send_s += time.perf_counter() - start
        self.plan_stats.send_cpu_s += time.thread_time() - start_cpu
        self.plan_stats.num_plans += 1
        self.plan_stats.num_bytes += len(data)

    # -- startup ---------------------------------------------------------------------------

    def _wait_loaded(self) -> None:
        """Wait until every worker reports its shard loaded; raise with a worker's error."""
        pending = {w.rank: w for w in self._workers}
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while pending:
            waitables = [w.conn for w in pending.values()] + [
                w.process.sentinel for w in pending.values()
            ]
            ready = multiprocessing.connection.wait(
                waitables, timeout=max(0.0, deadline - time.monotonic())
            )
            if not ready:
                raise RuntimeError(
                    f"tensor-parallel ranks {sorted(pending)} did not load "
                    f"their shards within {STARTUP_TIMEOUT_S:.0f} s"
                )
            for worker in list(pending.values()):
                if worker.conn in ready or worker.conn.poll():
                    kind, detail = worker.conn.recv()
                    if kind != "loaded":
                        raise RuntimeError(
                            f"tensor-parallel rank {worker.rank} failed to start: {detail}"
                        )
                    del pending[worker.rank]
                elif worker.process.sentinel in ready:
                    raise RuntimeError(
                        f"tensor-parallel rank {worker.rank} exited during "
                        f"startup ({_exit_description(worker.process)})"
                    )

    # -- faults ----------------------------------------------------------------------------

    def _watch(self) -> None:
        sentinels = {w.process.sentinel: w for w in self._workers}
        ready = multiprocessing.connection.wait([*sentinels, self._wake_r])
        if self._closed:
            return
        dead = [w for sentinel, w in sentinels.items() if sentinel in ready]
        if dead:
            self._fail(self._death_message(dead[0]))

    def _dead_worker_reason(self, wait_s: float) -> str | None:
        sentinels = {w.process.sentinel: w for w in self._workers}
        ready = multiprocessing.connection.wait(list(sentinels), timeout=wait_s)
        dead = [w for sentinel, w in sentinels.items() if sentinel in ready]
        return self._death_message(dead[0]) if dead else None

    def _death_message(self, worker: _Worker) -> str:
        with self._reap_lock:
            return _death_message_of(worker)

    def _fail(self, message: str) -> None:
        if self._failure is not None:
            return
        self._failure = message
        logger.error("tensor parallelism failed: %s; stopping the other ranks", message)
        # The survivors are stuck in (or will fail) a collective: stop them now.
        self._stop_workers(graceful=False)

    def _stop_workers(self, graceful: bool) -> None:
        with self._reap_lock:
            self._stop_workers_locked(graceful)

    def _stop_workers_locked(self, graceful: bool) -> None:
        if graceful:
            try:
                self._send_plan(None)
            except OSError:
                graceful = False
        deadline = time.monotonic() + (STOP_TIMEOUT_S if graceful else 0.0)
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(STOP_TIMEOUT_S)
            worker.conn.close()


def _spec_for_rank(spec: ShardSpec, rank: int) -> ShardSpec:
    """Rank ``r`` uses the ``r``-th GPU after the configured one; the CPU is shared."""
    device = torch.device(spec.device)
    if device.type != "cuda":
        return spec
    return replace(spec, device=f"cuda:{(device.index or 0) + rank}")


def _death_message_of(worker: _Worker) -> str:
    worker.process.join(1.0)  # its sentinel fires a moment before its exit code is known
    return (
        f"tensor-parallel rank {worker.rank} (pid {worker.process.pid}) died: "
        f"{_exit_description(worker.process)}"
    )


def _exit_description(process: multiprocessing.process.BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
