"""Block data of a move over gloo, point to point between two instance processes
(``ClusterConfig.migration_transport = "gloo"``; the object store is the default).

Measured on this project's machine (``../shared/design/llumnix.md`` section 3): 4 MiB
between two Ray actors in about 2.4 ms over gloo against 6-7 ms through the object store.
Llumnix's gloo backend spans one collective group over every instance, rebuilt on each
scale change; here each (source, destination) pair gets its own two-rank group, made on
demand on the first move between them and cached on both sides:

* **No default group.** The instance process may own ``torch.distributed``'s default
  group already (tensor-parallel ranks), so ``init_process_group`` is never called: a
  ``ProcessGroupGloo`` is built directly over a ``TCPStore`` that the source (rank 0)
  hosts on 127.0.0.1 (a socket bound there and handed to the store: the store alone
  would listen on every interface), and gloo's device listens on 127.0.0.1 too.
* **Rendezvous through the control plane** (Ray calls, ``join``): the source opens the
  store and asks the destination to ``join``; both sides then build the group, which
  returns once they are connected, within the timeout.
* **Peers change.** The source asks the destination once per move whether it still holds
  the group (``has``); if not (it restarted, or dropped the group after a failed
  transfer) a new group is made, and the destination replaces the one it had from that
  source. A side whose transfer fails drops the group (the connection closes, so the
  other side's pending operation fails at once instead of at its timeout).
* **A stage** (``GlooPeer.stage_in``): the source issues the destination's control call
  first (``gloo_stage_in``: shapes, dtypes and tags in its small arguments), then sends
  each rank's tensor (bfloat16 as is), then waits for the call's result. The
  destination receives into tensors of its own (not its cache) and stages them in as the
  object store path does. Tags are unique per transfer, so moves between the same pair
  may overlap. Every wait is bounded by the timeout: a dead peer never holds a thread
  forever.
* **Receive buffers are reused** once a stage has written their data into the cache:
  fresh ones would page-fault while the data arrives and halve the rate at large stages.
"""

from __future__ import annotations

import datetime
import logging
import math
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .instance import Peer

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_TAG_LIMIT = 2**30
_ALIGN = 64  # bytes: where each tensor of a receive buffer starts

# A tensor's (shape, dtype), sent ahead of its data.
TensorSpec = tuple[tuple[int, ...], torch.dtype]


@dataclass(eq=False)
class PairGroup:
    """A two-rank gloo group between a source (rank 0) and a destination (rank 1)."""

    group_id: str
    rank: int
    process_group: Any  # torch.distributed.ProcessGroupGloo
    store: Any  # kept alive with the group
    _next_tag: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_tags(self, n: int) -> int:
        """The first of ``n`` tags no other transfer of this group uses now."""
        with self._lock:
            first = self._next_tag if self._next_tag + n <= _TAG_LIMIT else 0
            self._next_tag = first + n
        return first

    def send(self, tensors: Sequence[torch.Tensor], tag: int, timeout_s: float) -> None:
        """Send tensor ``i`` with tag ``tag + i`` to the other rank; returns once sent."""
        tensors = [tensor.contiguous() for tensor in tensors]
        works = [self.process_group.send([tensor], 1 - self.rank, tag + i)
                 for i, tensor in enumerate(tensors)]
        for work in works:
            work.wait(datetime.timedelta(seconds=timeout_s))

    def recv(self, tensors: Sequence[torch.Tensor], tag: int, timeout_s: float) -> None:
        """Receive into ``tensors`` (contiguous), with tags ``tag``, ``tag + 1``, ..."""
        works = [self.process_group.recv([tensor], 1 - self.rank, tag + i)
                 for i, tensor in enumerate(tensors)]
        for work in works:
            work.wait(datetime.timedelta(seconds=timeout_s))


class _Buffers:
    """Receive buffers kept for the next transfers: a fresh allocation per transfer costs
    as much as the transfer itself (its pages fault in as the data arrives: 64 MiB in
    about 36 ms against 17 ms into a buffer used before, measured here). At most
    ``max_buffers`` (one per receiving thread) of at most ``max_bytes`` each are kept."""

    def __init__(self, max_buffers: int = 2, max_bytes: int = 256 * 2**20) -> None:
        self._free: list[torch.Tensor] = []  # flat uint8
        self._lock = threading.Lock()
        self._max_buffers = max_buffers
        self._max_bytes = max_bytes

    def take(self, specs: Sequence[TensorSpec]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A buffer, and tensors shaped as ``specs`` in it (contiguous, 64-byte aligned)."""
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + -(-size // _ALIGN) * _ALIGN)
        with self._lock:  # the smallest that fits (by index: tensors' == is elementwise)
            fitting = [i for i, b in enumerate(self._free) if b.numel() >= offsets[-1]]
            buffer = (self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
                      if fitting else None)
        if buffer is None:
            buffer = torch.empty(max(offsets[-1], 1), dtype=torch.uint8)
        tensors = [buffer[offset:offset + size].view(dtype).view(shape)
                   for (shape, dtype), offset, size in zip(specs, offsets[:-1], sizes,
                                                              strict=True)]
        return buffer, tensors

    def give_back(self, buffer: torch.Tensor) -> None:
        if buffer.numel() > self._max_bytes:
            return
        with self._lock:
            self._free.append(buffer)
            if len(self._free) > self._max_buffers:
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


def _process_group(store: Any, group_id: str, rank: int, timeout_s: float) -> Any:
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=_HOST)]
    # Returns once both ranks are connected (each publishes its address in the store).
    return dist.ProcessGroupGloo(dist.PrefixStore(f"pair/{group_id}/", store), rank, 2,
                                 options)


# ``join(group_id, port)`` starts the destination's side of a new group (a remote call)
# and returns a function waiting for it; ``has(group_id)`` asks the destination whether
# it holds the group still.
StartJoin = Callable[[str, int], Callable[[], Any]]


class PairGroups:
    """This process's pairwise groups: as a source, by destination; as a destination, by
    source. Keys are the other instance's name, as the two sides agree on it."""

    def __init__(self, timeout_s: float) -> None:
        if not torch.distributed.is_available():
            raise RuntimeError("migration_transport=gloo needs torch.distributed")
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._outgoing: dict[str, PairGroup] = {}
        self._incoming: dict[str, PairGroup] = {}
        self._connecting: dict[str, threading.Lock] = {}
        self.num_groups_made = 0  # as a source, since start
        self.num_bytes_sent = 0
        self.num_bytes_received = 0
        self._buffers = _Buffers()

    # -- the source's side -------------------------------------------------------------------

    def connect(self, destination: str, has: Callable[[str], bool],
                join: StartJoin) -> PairGroup:
        """The group to ``destination``: the cached one if the destination still holds it,
        else a new one (raises if it cannot be made within the timeout)."""
        with self._lock:
            connecting = self._connecting.setdefault(destination, threading.Lock())
        with connecting:  # one group per pair, however many moves start at once
            with self._lock:
                group = self._outgoing.get(destination)
            if group is not None:
                if has(group.group_id):
                    return group
                self.drop_outgoing(destination, group)
            group = self._open(join)
            with self._lock:
                self._outgoing[destination] = group
                self.num_groups_made += 1
            return group

    def _open(self, join: StartJoin) -> PairGroup:
        import torch.distributed as dist

        group_id = uuid.uuid4().hex
        timeout = datetime.timedelta(seconds=self.timeout_s)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((_HOST, 0))
            listener.listen(16)
            port = listener.getsockname()[1]
            # The store owns the socket from here (and closes it).
            store = dist.TCPStore(_HOST, port, 2, True, timeout, wait_for_workers=False,
                                  master_listen_fd=listener.detach(), use_libuv=True)
        finally:
            listener.close()  # a no-op once detached
        wait_joined = join(group_id, port)  # the destination builds its side meanwhile
        process_group = _process_group(store, group_id, 0, self.timeout_s)
        wait_joined()
        return PairGroup(group_id, 0, process_group, store)

    def send(self, destination: str, group: PairGroup, tensors: Sequence[torch.Tensor],
             tag: int) -> None:
        try:
            group.send(tensors, tag, self.timeout_s)
        except Exception:
            self.drop_outgoing(destination, group)
            raise
        with self._lock:
            self.num_bytes_sent += sum(t.numel() * t.element_size() for t in tensors)

    def drop_outgoing(self, destination: str, group: PairGroup) -> None:
        with self._lock:
            if self._outgoing.get(destination) is group:
                del self._outgoing[destination]

    # -- the destination's side --------------------------------------------------------------

    def join(self, source: str, group_id: str, port: int) -> None:
        """Build this side (rank 1) of ``source``'s new group; it replaces any older one."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.timeout_s)
        store = dist.TCPStore(_HOST, port, 2, False, timeout)
        group = PairGroup(group_id, 1, _process_group(store, group_id, 1, self.timeout_s),
                          store)
        with self._lock:
            self._incoming[source] = group

    def has(self, source: str, group_id: str) -> bool:
        with self._lock:
            group = self._incoming.get(source)
        return group is not None and group.group_id == group_id

    def receive(self, source: str, group_id: str, tag: int, specs: Sequence[TensorSpec]
                ) -> tuple[list[torch.Tensor], Callable[[], None]]:
        """One transfer from ``source``: tensors as ``specs`` describe them, and a function
        to call once they are used up (they are in a buffer that later transfers reuse;
        never call it while anything may still read them). Raises if the group is unknown
        or the transfer fails."""
        with self._lock:
            group = self._incoming.get(source)
        if group is None or group.group_id != group_id:
            raise LookupError(f"no gloo group {group_id} from instance {source}")
        buffer, tensors = self._buffers.take(specs)
        try:
            group.recv(tensors, tag, self.timeout_s)
        except Exception:  # the buffer is not reused: gloo may still write into it
            with self._lock:
                if self._incoming.get(source) is group:
                    del self._incoming[source]
            raise
        with self._lock:
            self.num_bytes_received += sum(t.numel() * t.element_size() for t in tensors)
        return tensors, lambda: self._buffers.give_back(buffer)

    # -- both ------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"outgoing": {k: g.group_id for k, g in self._outgoing.items()},
                    "incoming": {k: g.group_id for k, g in self._incoming.items()},
                    "groups_made": self.num_groups_made,
                    "bytes_sent": self.num_bytes_sent,
                    "bytes_received": self.num_bytes_received}

    def close(self) -> None:
        """Drop every group (their connections close once no transfer holds them)."""
        with self._lock:
            self._outgoing.clear()
            self._incoming.clear()
        self._buffers.clear()


class GlooPeer(Peer):
    """A destination instance reached by control calls (``call``, and ``start``: issue a
    call, return a function waiting for its result) with block data over gloo.

    ``source`` is this instance's name as the destination knows it, ``destination`` the
    destination's in ``groups``. The destination's actor has ``gloo_has``, ``gloo_join``
    and ``gloo_stage_in`` (``cluster/ray_cluster.py``).
    """

    def __init__(self, call: Callable[..., Any], start: Callable[..., Callable[[], Any]],
                 groups: PairGroups, source: str, destination: str) -> None:
        super().__init__(call)
        self._start = start
        self._groups = groups
        self._source = source
        self._destination = destination
        self._checked: PairGroup | None = None  # the group, once confirmed for this move

    def transport(self, data: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        return data  # the tensors themselves: ``stage_in`` sends them

    def stage_in(self, request_id: str, on_host: bool, data: Sequence[Any], num_blocks: int,
                 snapshot: Any) -> str:
        if not data:  # nothing to copy (a last stage with no block left)
            return super().stage_in(request_id, on_host, data, num_blocks, snapshot)
        try:
            group = self._group()
            tag = group.next_tags(len(data))
            specs = [(tuple(tensor.shape), tensor.dtype) for tensor in data]
            wait = self._start("gloo_stage_in", self._source, group.group_id, tag, specs,
                               request_id, on_host, num_blocks, snapshot)
            try:
                self._groups.send(self._destination, group, data, tag)
            except Exception:
                self._checked = None
                try:  # its receive fails too (the group is gone): let its call end first
                    wait()
                except Exception:
                    pass
                raise
            return wait()
        except Exception as exc:
            return f"destination failed: {type(exc).__name__}: {exc}"

    def _group(self) -> PairGroup:
        if self._checked is None:
            def has(group_id: str) -> bool:
                return bool(self._call("gloo_has", self._source, group_id))

            def join(group_id: str, port: int) -> Callable[[], Any]:
                return self._start("gloo_join", self._source, group_id, port)

            self._checked = self._groups.connect(self._destination, has, join)
        return self._checked
