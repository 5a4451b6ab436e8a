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
"""

from __future__ import annotations

from collections import deque


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
        self._tables: dict[str, list[int]] = {}
        self.num_host_blocks = num_host_blocks
        self._host_free: deque[int] = deque(range(num_host_blocks))
        self._host_tables: dict[str, list[int]] = {}
        self._pending_free: list[int] = []
        self._pending_host_free: list[int] = []

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
        needed = -(-num_tokens // self.tokens_per_block(hidden)) - (
            0 if table is None else len(table))
        if needed <= 0 and table is not None:
            return True  # the common decode step: the last block has room
        if needed > len(self._free):
            return False
        if table is None:
            if request_id in self._host_tables:
                raise ValueError(f"{request_id!r} is on the host tier: swap it in first")
            table = self._tables[request_id] = []
            if hidden:
                self._hidden.add(request_id)
        for _ in range(needed):
            block_id = self._free.popleft()
            self._ref_counts[block_id] = 1
            table.append(block_id)
        return True

    def free(self, request_id: str) -> int:
        """Release every block of ``request_id`` in both tiers; returns device blocks freed."""
        self._hidden.discard(request_id)
        host_table = self._host_tables.pop(request_id, None)
        if host_table is not None:
            self._host_free.extend(host_table)
        table = self._tables.pop(request_id, None)
        if table is None:
            return 0
        return len(self._release_device(table, self._free))

    def _release_device(self, table: list[int], into: deque[int] | list[int]) -> list[int]:
        released = []
        # Freed in reverse so the tail blocks of a table are reused last.
        for block_id in reversed(table):
            if self._ref_counts[block_id] <= 0:
                raise AssertionError(f"double free of block {block_id}")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                into.append(block_id)
                released.append(block_id)
        return released

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
        table = [self._free.popleft() for _ in host_table]
        for block_id in table:
            self._ref_counts[block_id] = 1
        del self._host_tables[request_id]
        self._tables[request_id] = table
        self._pending_host_free.extend(host_table)
        return list(zip(host_table, table, strict=True))

    def commit_pending(self) -> None:
        """Make blocks vacated by the previous iteration's swaps allocatable."""
        self._free.extend(self._pending_free)
        self._pending_free.clear()
        self._host_free.extend(self._pending_host_free)
        self._pending_host_free.clear()

    def block_table(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def block_ids(self, request_id: str) -> tuple[int, ...]:
        """The device block table as a tuple (one copy, for plans)."""
        return tuple(self._tables.get(request_id, ()))

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
        for table in self._tables.values():
            for block_id in table:
                counts[block_id] += 1
        for block_id in range(self.num_blocks):
            assert counts[block_id] == self._ref_counts[block_id], (
                f"block {block_id}: ref count {self._ref_counts[block_id]} but "
                f"{counts[block_id]} owners"
            )
        free += self._pending_free
        assert len(set(free)) == len(free), "a pending block is also free"
        assert all(self._ref_counts[b] == 0 for b in free), "a free block has owners"
        num_owned = sum(1 for c in counts if c > 0)
        assert num_owned + len(free) == self.num_blocks, (
            f"leak: {num_owned} owned + {len(free)} free or pending != {self.num_blocks}"
        )
        assert not set(self._tables) & set(self._host_tables), "a request in both tiers"
        assert self._hidden <= set(self._tables) | set(self._host_tables), (
            "a hidden-mode mark without blocks")
        host_owned = [b for table in self._host_tables.values() for b in table]
        host_all = host_owned + list(self._host_free) + self._pending_host_free
        assert sorted(host_all) == list(range(self.num_host_blocks)), (
            f"host tier: {len(host_owned)} owned + {len(self._host_free)} free + "
            f"{len(self._pending_host_free)} pending is not each of "
            f"{self.num_host_blocks} blocks exactly once"
        )
