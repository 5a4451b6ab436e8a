"""Paged KV block accounting: which physical blocks each request owns. No torch.

A request's block table maps logical block ``i`` (tokens ``[i*B, (i+1)*B)``, ``B`` the
block size) to a physical block id in ``[0, num_blocks)``. The engine holds one tensor pool
per layer indexed by these ids; this class only does the bookkeeping.
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

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Blocks that must be added so the request's table covers ``num_tokens``."""
        have = len(self._tables.get(request_id, ()))
        return max(0, self.blocks_for_tokens(num_tokens) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.num_blocks_needed(request_id, num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow ``request_id``'s table to cover ``num_tokens`` tokens; False if short."""
        needed = self.num_blocks_needed(request_id, num_tokens)
        if needed > len(self._free):
            return False
        table = self._tables.setdefault(request_id, [])
        for _ in range(needed):
            block_id = self._free.popleft()
            self._ref_counts[block_id] = 1
            table.append(block_id)
        return True

    def free(self, request_id: str) -> int:
        """Release every block of ``request_id``; returns how many became free."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return 0
        num_freed = 0
        # Freed in reverse so the tail blocks of a table are reused last.
        for block_id in reversed(table):
            if self._ref_counts[block_id] <= 0:
                raise AssertionError(f"double free of block {block_id}")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free.append(block_id)
                num_freed += 1
        return num_freed

    def block_table(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._tables

    def owners(self) -> list[str]:
        return list(self._tables)

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
        assert all(self._ref_counts[b] == 0 for b in free), "a free block has owners"
        num_owned = sum(1 for c in counts if c > 0)
        assert num_owned + len(free) == self.num_blocks, (
            f"leak: {num_owned} owned + {len(free)} free != {self.num_blocks}"
        )
