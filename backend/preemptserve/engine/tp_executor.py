"""The driver of tensor-parallel ranks: rank 0 lives in this process, ranks 1.. are workers.

Rank 0 (this process: the engine, inside the Triton model) schedules once per iteration
and sends the plan to every worker over its own pipe (plain data; a pipe, not a
collective, so that idle workers can wait for the next plan without any timeout, and a
dead peer shows up as a broken pipe). A plan carries only what changed since the
previous one: per scheduled request its new tokens and the blocks appended to its table
(the whole table only when it is new or was replaced), plus the swaps and the requests
that left (``tp_plan``); each worker rebuilds the exact ``SchedulerOutput`` from it.
Then every rank runs the plan's swaps on its own KV slices and the forward on its own
heads; the model's all-reduces (gloo on CPU, NCCL on CUDA) keep them in lock step. Only
rank 0 samples.

Block commands (``read_blocks`` / ``write_blocks``, for moving a request to another
engine) go down the same pipes between steps; each worker answers on its pipe and rank 0
collects the answers.

Faults: a monitor thread waits on the workers' process sentinels; a step or a block
command that fails (broken pipe, a collective that errors or times out, a worker that
reports an error or does not answer) fails the executor too. After a failure every call
raises ``RankFailure`` and the remaining workers are stopped: the engine cannot continue
with a missing shard. Workers stop when ``shutdown()`` tells them, or on their own when
this process dies (see ``tp_worker``).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.connection
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from ..core.scheduler import SchedulerOutput
from ..model.parallel import TensorParallel
from .executor import ShardSpec, build_shard, run_step
from .sampler import SamplingState
from .tp_plan import OK, READ_BLOCKS, WRITE_BLOCKS, PlanEncoder, compact
from .tp_worker import COLLECTIVE_TIMEOUT_S, init_process_group, worker_main

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 5.0
# A worker that has not answered a block command within this long has failed.
REPLY_TIMEOUT_S = COLLECTIVE_TIMEOUT_S


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or a step across ranks failed: no more steps."""


class _RankError(RuntimeError):
    """A worker reported that a block command failed (it exits after reporting)."""


@dataclass
class PlanStats:
    """Rank 0's cost of sending plans: encoding, pickling, writing to every worker's pipe.

    ``num_bytes`` counts each plan once (every worker gets the same bytes); ``last_bytes``
    is the latest plan's size. ``send_s`` is wall time; ``send_cpu_s`` the sending
    thread's CPU time (without the time it waits while a woken worker takes its core).
    """

    num_plans: int = 0
    num_bytes: int = 0
    last_bytes: int = 0
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
        self._plans = PlanEncoder()
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
        # A driver that exits without shutdown(): stop the workers before multiprocessing's
        # own exit handler (registered earlier, so run later) joins them (they ignore
        # SIGTERM: it would wait forever).
        atexit.register(self._stop_at_exit)
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

    def read_blocks(self, block_ids: Sequence[int], on_host: bool) -> list[torch.Tensor]:
        ids = tuple(int(b) for b in block_ids)
        swapper = self.shard.swapper
        swapper.check_block_ids(ids, on_host)  # before anything is sent
        message = pickle.dumps((READ_BLOCKS, ids, on_host), protocol=pickle.HIGHEST_PROTOCOL)
        return self._on_all_ranks(
            [message] * len(self._workers), lambda: swapper.read_blocks(ids, on_host)
        )

    def write_blocks(
        self, block_ids: Sequence[int], on_host: bool, data: Sequence[torch.Tensor]
    ) -> None:
        ids = tuple(int(b) for b in block_ids)
        swapper = self.shard.swapper
        swapper.check_block_ids(ids, on_host)
        if len(data) != self.world_size:
            raise ValueError(f"{self.world_size} ranks: need as many tensors, got {len(data)}")
        for tensor in data:
            swapper.check_block_data(ids, tensor)
        messages = [
            pickle.dumps(
                (WRITE_BLOCKS, ids, on_host, compact(data[worker.rank])),
                protocol=pickle.HIGHEST_PROTOCOL,
            )
            for worker in self._workers
        ]
        self._on_all_ranks(messages, lambda: swapper.write_blocks(ids, on_host, data[0]))

    def shutdown(self) -> None:
        """Stop the workers (asked first, then killed) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._stop_at_exit)
        self._wake_w.send_bytes(b"x")
        self._stop_workers(graceful=self._failure is None)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._saved_num_threads)

    def _stop_at_exit(self) -> None:
        if not self._closed:
            self._closed = True
            self._stop_workers(graceful=False)

    # -- plans -----------------------------------------------------------------------------

    def _send_plan(self, output: SchedulerOutput) -> None:
        start, start_cpu = time.perf_counter(), time.thread_time()
        data = pickle.dumps(self._plans.encode(output), protocol=pickle.HIGHEST_PROTOCOL)
        for worker in self._workers:
            worker.conn.send_bytes(data)
        stats = self.plan_stats
        stats.send_s += time.perf_counter() - start
        stats.send_cpu_s += time.thread_time() - start_cpu
        stats.num_plans += 1
        stats.num_bytes += len(data)
        stats.last_bytes = len(data)

    # -- block commands ----------------------------------------------------------------------

    def _on_all_ranks(self, messages: list[bytes], local: Callable[[], object]) -> list:
        """Send worker ``i`` ``messages[i]``, run ``local`` as rank 0, collect the answers
        (rank order). A failure anywhere fails the executor."""
        if self._failure is not None:
            raise RankFailure(self._failure)
        try:
            for worker, message in zip(self._workers, messages, strict=True):
                worker.conn.send_bytes(message)
            results = [local()]
            results += [self._answer(worker) for worker in self._workers]
            return results
        except Exception as exc:
            self._fail(
                str(exc) if isinstance(exc, _RankError)
                else self._dead_worker_reason(wait_s=1.0)
                or f"a tensor-parallel block command failed: {type(exc).__name__}: {exc}"
            )
            raise RankFailure(self._failure) from exc

    @staticmethod
    def _answer(worker: _Worker) -> object:
        if not worker.conn.poll(REPLY_TIMEOUT_S):
            raise TimeoutError(
                f"tensor-parallel rank {worker.rank} did not answer "
                f"within {REPLY_TIMEOUT_S:.0f} s"
            )
        kind, payload = pickle.loads(worker.conn.recv_bytes())
        if kind != OK:
            raise _RankError(f"tensor-parallel rank {worker.rank} failed: {payload}")
        return payload

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
            stop = pickle.dumps(None)
            try:
                for worker in self._workers:
                    worker.conn.send_bytes(stop)
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
