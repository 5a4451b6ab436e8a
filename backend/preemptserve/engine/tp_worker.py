"""A tensor-parallel worker rank (1..tp-1): a process started by ``TensorParallelExecutor``.

Life of a worker::

    load its shard -> report ("loaded", pid) on its pipe -> join the process group
    loop: message = recv from the pipe (``tp_plan``)
          None -> leave
          a plan -> rebuild the SchedulerOutput from it and its mirror of the block
                    tables; run the swaps on its own KV slices and the forward on its
                    own heads (all-reduces inside the model)
          read / write blocks -> do it on its own KV slices; answer ("ok", result)

It never schedules or samples. It exits when told to (``None``), when the driver's end
of the pipe closes, when a collective fails (a peer died), or when its parent process
dies (a watchdog thread on the parent's sentinel): it never outlives the Triton model.
SIGINT and SIGTERM are ignored: the driver decides when its workers stop.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from ..model.parallel import TensorParallel
from .executor import ShardSpec, build_shard, run_step
from .tp_plan import OK, PLAN, READ_BLOCKS, WRITE_BLOCKS, PlanDecoder, compact

logger = logging.getLogger(__name__)

# A collective that waits longer than this for a peer fails (the peer is gone or stuck).
COLLECTIVE_TIMEOUT_S = 60.0


def init_process_group(backend: str, init_method: str, rank: int, world_size: int) -> None:
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def worker_main(
    rank: int,
    world_size: int,
    spec: ShardSpec,
    backend: str,
    init_method: str,
    conn: multiprocessing.connection.Connection,
    num_threads: int,
) -> None:
    """Entry point of a spawned worker process."""
    # The driver stops its workers; a signal sent to the whole process group (Ctrl-C, a
    # supervisor stopping the server's group) must not kill them before it can.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"[preemptserve tp rank {rank}] %(levelname)s %(message)s",
    )
    try:
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        shard = build_shard(spec, TensorParallel(rank, world_size))
    except Exception as exc:
        logger.exception("rank %d failed to load its shard", rank)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    conn.send(("loaded", os.getpid()))
    init_process_group(backend, init_method, rank, world_size)
    num_steps = 0
    plans = PlanDecoder()
    try:
        while True:
            message = pickle.loads(conn.recv_bytes())
            if message is None:
                break
            kind = message[0]
            if kind == PLAN:
                run_step(shard, plans.decode(message), None)
                num_steps += 1
            elif kind == READ_BLOCKS:
                _, block_ids, on_host = message
                data = compact(shard.swapper.read_blocks(block_ids, on_host))
                conn.send_bytes(pickle.dumps((OK, data), protocol=pickle.HIGHEST_PROTOCOL))
            elif kind == WRITE_BLOCKS:
                _, block_ids, on_host, data = message
                shard.swapper.write_blocks(block_ids, on_host, data)
                conn.send_bytes(pickle.dumps((OK, None)))
            else:
                raise ValueError(f"unknown message kind {kind!r}")
    except EOFError:
        logger.warning("rank %d: the driver closed the plan channel; exiting", rank)
        raise SystemExit(1) from None
    except Exception as exc:
        logger.exception("rank %d failed in step %d", rank, num_steps)
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        raise SystemExit(1) from None
    dist.destroy_process_group()
    logger.info("rank %d stopped after %d steps", rank, num_steps)


def _exit_with_parent() -> None:
    """Exit at once when the parent process dies, whatever this process is doing."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
