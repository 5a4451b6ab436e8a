"""Paged KV block accounting in two tiers: which physical blocks each request owns. No torch.

A request's block table maps logical block ``i`` (tokens ``[i*B, (i+1)*B)``, ``B`` the
block size) to a physical block id in ``[0, num_blocks)``. The engine holds one tensor pool
per layer indexed by these ids; this class only does the bookkeeping.

A request's KV lives wholly in one tier at a time::

    device pool  --swap_out-->  host pool        (pairs: device id -> host id)
    device pool  <--swap_in---  host pool        (pairs: host id -> device id)

A request in hidden-cache mode (``hidden=True``) stores a normalised hidden state per token
instead of K and V; where that is half the bytes (multi-head attention) one block holds
``hidden_tokens_per_block = 2 * B`` of its tokens, so it needs half the blocks. The mode of
a table is fixed from its first allocation until it is freed.

Blocks a swap vacates are *pending* until ``commit_pending()`` (called once per
iteration, before scheduling): their copy may still be in flight during the iteration
that planned it, so they must not be handed to anyone in that same iteration.

Sequences of one prompt (``num_return_sequences``) share its blocks: ``fork(parent,
child, n)`` gives the child the parent's full blocks of its first ``n`` tokens (reference
counts go up) and a copy of the partly filled block after them, which the child goes on
writing (copy on write)::

    parent  [A][B][C]          tokens 0..n-1 end inside C
    child   [A][B][C']         C' = a new block, C copied into it by the engine

Shared blocks are full and nobody writes them again; a table holding any stays on the
device (``swap_out`` refuses it), and freeing it returns a block only with its last owner.

Moving a request to another engine uses three more operations (vLLM's delayed free on
``finished_sending`` is the pattern for the first):

* ``pin(request_id)``: the blocks the request holds now, in either tier, are not reused
  until ``unpin``, even if meanwhile the request is freed, swapped or recomputed (their
  contents may still be being sent);
* ``reserve(request_id, n)``: on the receiving engine, set aside ``n`` more blocks for a
  request that is arriving (called again to extend the reservation); ``adopt`` makes the
  reservation the request's table; ``release_reservation`` gives it back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class BlockManager:
    """Allocates fixed-size KV blocks to requests, all-or-nothing.

    Contract: ``allocate`` either grows a table to cover the requested number of tokens
    or changes nothing and returns False. ``free`` returns every block of a request.
    Blocks are reference counted so a block may later be shared; ``check_invariants``
    raises ``AssertionError`` on a leak, a double free or a wrong count.
    """

    def __init__(
        self, num_blocks: int, block_size: int, num_host_blocks: int = 0,
        hidden_tokens_per_block: int = 0,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0 or num_host_blocks < 0:
            raise ValueError(
                f"need num_blocks > 0, block_size > 0 and num_host_blocks >= 0, got "
                f"{num_blocks}, {block_size}, {num_host_blocks}"
            )
        if hidden_tokens_per_block and hidden_tokens_per_block <= block_size:
            raise ValueError(
                f"hidden_tokens_per_block must exceed block_size ({block_size}) to save "
                f"memory, got {hidden_tokens_per_block}; 0 disables hidden mode"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        # 0: the engine offers no hidden-cache mode (it would not save memory).
        self.hidden_tokens_per_block = hidden_tokens_per_block
        self._hidden: set[str] = set()  # requests whose table holds hidden states
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        # Device tables are tuples (replaced as they grow): ``block_ids`` hands them out.
        self._tables: dict[str, tuple[int, ...]] = {}
        self.num_host_blocks = num_host_blocks
        self._host_free: deque[int] = deque(range(num_host_blocks))
        self._host_tables: dict[str, list[int]] = {}
        self._pending_free: list[int] = []
        self._pending_host_free: list[int] = []
        # Migration: blocks set aside for arriving requests (device and host tier), pinned
        # blocks per request, and pinned blocks released while pinned (free at unpin).
        self._reserved: dict[str, list[int]] = {}
        self._host_reserved: dict[str, list[int]] = {}
        self._pins: dict[str, tuple[frozenset[int], frozenset[int]]] = {}
        self._deferred: set[int] = set()
        self._host_deferred: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def supports_hidden(self) -> bool:
        return self.hidden_tokens_per_block > 0

    def is_hidden(self, request_id: str) -> bool:
        return request_id in self._hidden

    def tokens_per_block(self, hidden: bool = False) -> int:
        if not hidden:
            return self.block_size
        if not self.hidden_tokens_per_block:
            raise ValueError("this cache has no hidden-cache mode")
        return self.hidden_tokens_per_block

    def blocks_for_tokens(self, num_tokens: int, hidden: bool = False) -> int:
        return -(-num_tokens // self.tokens_per_block(hidden))

    def num_blocks_needed(self, request_id: str, num_tokens: int, hidden: bool = False) -> int:
        """Blocks that must be added so the request's table covers ``num_tokens``."""
        have = len(self._tables.get(request_id, ()))
        return max(0, self.blocks_for_tokens(num_tokens, hidden) - have)

    def can_allocate(self, request_id: str, num_tokens: int, hidden: bool = False) -> bool:
        return self.num_blocks_needed(request_id, num_tokens, hidden) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int, hidden: bool = False) -> bool:
        """Grow ``request_id``'s table to cover ``num_tokens`` tokens; False if short.

        ``hidden`` must match the mode of the request's existing table (``ValueError``).
        """
        table = self._tables.get(request_id)
        if table is not None and hidden != (request_id in self._hidden):
            raise ValueError(f"{request_id!r}: a table changes cache mode only after free()")
        tokens_per_block = self.tokens_per_block(hidden) if hidden else self.block_size
        if table is not None and num_tokens <= len(table) * tokens_per_block:
            return True  # the common decode step: the last block has room
        needed = -(-num_tokens // tokens_per_block) - (0 if table is None else len(table))
        if needed > len(self._free):
            return False
        if table is None:
            if request_id in self._host_tables:
                raise ValueError(f"{request_id!r} is on the host tier: swap it in first")
            table = ()
            if hidden:
                self._hidden.add(request_id)
        new_blocks = [self._free.popleft() for _ in range(needed)]
        for block_id in new_blocks:
            self._ref_counts[block_id] = 1
        # A new tuple once every block of tokens, so that block_ids needs no copy per step.
        self._tables[request_id] = table + tuple(new_blocks)
        return True

    def grow(self, request_ids: list[str]) -> bool:
        """One more block at the end of each of these requests' device tables, in this
        order (what ``allocate`` does when a token starts a block); False, with nothing
        changed, if too few are free."""
        free = self._free
        if len(request_ids) > len(free):
            return False
        tables, ref_counts = self._tables, self._ref_counts
        for request_id in request_ids:
            block_id = free.popleft()
            ref_counts[block_id] = 1
            tables[request_id] += (block_id,)
        return True

    def free(self, request_id: str) -> int:
        """Release every block of ``request_id`` in both tiers; returns device blocks freed."""
        self._hidden.discard(request_id)
        host_table = self._host_tables.pop(request_id, None)
        if host_table is not None:
            self._release_host(host_table, self._host_free)
        table = self._tables.pop(request_id, None)
        if table is None:
            return 0
        return len(self._release_device(table, self._free))

    def _release_device(self, table: Sequence[int], into: deque[int] | list[int]) -> list[int]:
        released = []
        # Freed in reverse so the tail blocks of a table are reused last.
        for block_id in reversed(table):
            if self._ref_counts[block_id] <= 0:
                raise AssertionError(f"double free of block {block_id}")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if self._pins and self._is_pinned(block_id, host=False):
                    self._deferred.add(block_id)  # reusable at unpin
                else:
                    into.append(block_id)
                released.append(block_id)
        return released

    def _release_host(self, table: list[int], into: deque[int] | list[int]) -> None:
        if not self._pins:
            into.extend(table)
            return
        for block_id in table:
            if self._is_pinned(block_id, host=True):
                self._host_deferred.add(block_id)
            else:
                into.append(block_id)

    # -- the host tier ---------------------------------------------------------------------

    @property
    def num_pending_blocks(self) -> int:
        """Device blocks vacated by this iteration's swap-outs, free from the next one."""
        return len(self._pending_free)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self._host_free)

    @property
    def num_used_host_blocks(self) -> int:
        return self.num_host_blocks - len(self._host_free)

    def is_on_host(self, request_id: str) -> bool:
        return request_id in self._host_tables

    def num_host_blocks_of(self, request_id: str) -> int:
        return len(self._host_tables.get(request_id, ()))

    def num_device_blocks_of(self, request_id: str) -> int:
        return len(self._tables.get(request_id, ()))

    def swap_out(
        self, request_id: str, reuse_now: bool = False
    ) -> list[tuple[int, int]] | None:
        """Move a request's KV to the host tier: ``[(device_id, host_id), ...]``, or None.

        None (nothing changes) if the request has no device blocks, shares any, or the
        host tier lacks room. The device blocks become free at the next ``commit_pending``,
        or at once with ``reuse_now`` (the engine then finishes the copy before the forward).
        """
        table = self._tables.get(request_id)
        if not table or len(table) > len(self._host_free):
            return None
        if any(self._ref_counts[b] != 1 for b in table):
            return None  # shared blocks stay where they are
        host_table = [self._host_free.popleft() for _ in table]
        del self._tables[request_id]
        self._release_device(table, self._free if reuse_now else self._pending_free)
        self._host_tables[request_id] = host_table
        return list(zip(table, host_table, strict=True))

    def swap_in(self, request_id: str) -> list[tuple[int, int]] | None:
        """Bring a request's KV back: ``[(host_id, device_id), ...]``, or None if short."""
        host_table = self._host_tables.get(request_id)
        if host_table is None or len(host_table) > len(self._free):
            return None
        table = tuple(self._free.popleft() for _ in host_table)
        for block_id in table:
            self._ref_counts[block_id] = 1
        del self._host_tables[request_id]
        self._tables[request_id] = table
        self._release_host(host_table, self._pending_host_free)
        return list(zip(host_table, table, strict=True))

    def commit_pending(self) -> None:
        """Make blocks vacated by the previous iteration's swaps allocatable."""
        self._free.extend(self._pending_free)
        self._pending_free.clear()
        self._host_free.extend(self._pending_host_free)
        self._pending_host_free.clear()

    def fork(self, parent_id: str, child_id: str,
             num_tokens: int) -> list[tuple[int, int]] | None:
        """Give ``child_id`` (holding no blocks) a table covering the first ``num_tokens``
        tokens of ``parent_id``'s device table, in the parent's cache mode: the parent's
        blocks wholly within them shared, the block holding the last of them, if partly
        filled, replaced by a new one for the child.

        Returns the copies the engine must make, ``[(parent's block, child's block)]``
        (none or one), or None (nothing changes) if ``num_tokens`` is 0, the parent's
        device table does not cover them, the child holds blocks, or no block is free.
        """
        table = self._tables.get(parent_id)
        if num_tokens <= 0 or table is None or child_id in self._tables \
                or child_id in self._host_tables or child_id in self._reserved:
            return None
        hidden = parent_id in self._hidden
        per_block = self.tokens_per_block(hidden)
        num_full, partial = divmod(num_tokens, per_block)
        if num_full + (partial > 0) > len(table) or (partial and not self._free):
            return None
        child = table[:num_full]
        for block_id in child:
            self._ref_counts[block_id] += 1
        copies = []
        if partial:
            block_id = self._free.popleft()
            self._ref_counts[block_id] = 1
            copies.append((table[num_full], block_id))
            child = (*child, block_id)
        self._tables[child_id] = child
        if hidden:
            self._hidden.add(child_id)
        return copies

    def num_shared_blocks_of(self, request_id: str) -> int:
        """Device blocks of the request that another table holds too."""
        return sum(1 for b in self._tables.get(request_id, ()) if self._ref_counts[b] > 1)

    def block_ids(self, request_id: str) -> tuple[int, ...]:
        """The device block table (immutable: a later allocation makes a new one)."""
        return self._tables.get(request_id, ())

    def host_block_ids(self, request_id: str) -> tuple[int, ...]:
        """The host block table (a copy)."""
        return tuple(self._host_tables.get(request_id, ()))

    # -- moving requests between engines -----------------------------------------------

    def pin(self, request_id: str) -> None:
        """Keep the blocks ``request_id`` holds now (both tiers) from reuse until ``unpin``.

        While pinned the request may still grow, swap, be recomputed or be freed: blocks
        it lets go of become free only at ``unpin``. Pinning twice raises ``ValueError``.
        """
        if request_id in self._pins:
            raise ValueError(f"{request_id!r} is pinned already")
        self._pins[request_id] = (frozenset(self._tables.get(request_id, ())),
                                  frozenset(self._host_tables.get(request_id, ())))

    def unpin(self, request_id: str) -> None:
        """End a ``pin``: blocks released meanwhile (and pinned by no one else) are free."""
        device, host = self._pins.pop(request_id, (frozenset(), frozenset()))
        for block_id in device & self._deferred:
            if not self._is_pinned(block_id, host=False):
                self._deferred.discard(block_id)
                self._free.append(block_id)
        for block_id in host & self._host_deferred:
            if not self._is_pinned(block_id, host=True):
                self._host_deferred.discard(block_id)
                self._host_free.append(block_id)

    def is_pinned(self, request_id: str) -> bool:
        return request_id in self._pins

    def _is_pinned(self, block_id: int, host: bool) -> bool:
        index = 1 if host else 0
        return any(block_id in pin[index] for pin in self._pins.values())

    def reserve(self, request_id: str, num_blocks: int, on_host: bool = False) -> list[int] | None:
        """Set aside ``num_blocks`` more free blocks of one tier for an arriving request.

        Creates or extends the request's reservation, all-or-nothing; returns the new
        block ids in order, or None (nothing changes) if the tier is short.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        free = self._host_free if on_host else self._free
        if num_blocks > len(free):
            return None
        if request_id in (self._tables if not on_host else self._host_tables):
            raise ValueError(f"{request_id!r} holds blocks already: nothing to reserve for")
        blocks = [free.popleft() for _ in range(num_blocks)]
        if not on_host:
            for block_id in blocks:
                self._ref_counts[block_id] = 1
        (self._host_reserved if on_host else self._reserved).setdefault(
            request_id, []).extend(blocks)
        return blocks

    def reserved_blocks(self, request_id: str, on_host: bool = False) -> tuple[int, ...]:
        return tuple((self._host_reserved if on_host else self._reserved).get(request_id, ()))

    def adopt(self, request_id: str, hidden: bool = False,
              on_host: bool = False) -> tuple[int, ...]:
        """Make the request's reservation in one tier its block table; returns the table.

        ``hidden``: the blocks hold hidden states (hidden-cache mode). Raises
        ``ValueError`` if there is no reservation or the request holds blocks already.
        """
        if hidden and not self.supports_hidden:
            raise ValueError("this cache has no hidden-cache mode")
        reserved = self._host_reserved if on_host else self._reserved
        if request_id not in reserved:
            raise ValueError(f"{request_id!r} has no reservation to adopt")
        if request_id in self._tables or request_id in self._host_tables:
            raise ValueError(f"{request_id!r} holds blocks already")
        table = reserved.pop(request_id)
        if on_host:
            self._host_tables[request_id] = table
        else:
            self._tables[request_id] = tuple(table)
        if hidden:
            self._hidden.add(request_id)
        return tuple(table)

    def release_reservation(self, request_id: str) -> int:
        """Give back a request's reservations in both tiers; returns the blocks released."""
        device = self._reserved.pop(request_id, [])
        host = self._host_reserved.pop(request_id, [])
        self._release_device(device, self._free)
        self._host_free.extend(host)
        return len(device) + len(host)

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._tables

    def device_owners(self) -> list[str]:
        return list(self._tables)

    def host_owners(self) -> list[str]:
        return list(self._host_tables)

    def owners(self) -> list[str]:
        return list(self._tables) + list(self._host_tables)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if any block is leaked, double-owned or miscounted."""
        free = list(self._free)
        assert len(set(free)) == len(free), "a block is in the free list twice"
        counts = [0] * self.num_blocks
        for table in (*self._tables.values(), *self._reserved.values()):
            for block_id in table:
                counts[block_id] += 1
        for block_id in range(self.num_blocks):
            assert counts[block_id] == self._ref_counts[block_id], (
                f"block {block_id}: ref count {self._ref_counts[block_id]} but "
                f"{counts[block_id]} owners"
            )
        free += self._pending_free + sorted(self._deferred)
        assert len(set(free)) == len(free), "a pending or deferred block is also free"
        assert all(self._ref_counts[b] == 0 for b in free), "a free block has owners"
        num_owned = sum(1 for c in counts if c > 0)
        assert num_owned + len(free) == self.num_blocks, (
            f"leak: {num_owned} owned + {len(free)} free or pending != {self.num_blocks}"
        )
        assert all(self._is_pinned(b, host=False) for b in self._deferred), (
            "a deferred block nobody pins")
        assert all(self._is_pinned(b, host=True) for b in self._host_deferred), (
            "a deferred host block nobody pins")
        assert not set(self._tables) & set(self._host_tables), "a request in both tiers"
        assert self._hidden <= set(self._tables) | set(self._host_tables), (
            "a hidden-mode mark without blocks")
        host_owned = [b for table in (*self._host_tables.values(),
                                      *self._host_reserved.values()) for b in table]
        host_all = (host_owned + list(self._host_free) + self._pending_host_free
                    + sorted(self._host_deferred))
        assert sorted(host_all) == list(range(self.num_host_blocks)), (
            f"host tier: {len(host_owned)} owned or reserved + {len(self._host_free)} free + "
            f"{len(self._pending_host_free)} pending or deferred is not each of "
            f"{self.num_host_blocks} blocks exactly once"
        )
