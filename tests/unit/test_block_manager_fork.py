"""Sequences of one prompt share its KV blocks: ``BlockManager.fork``, copy on write."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from preemptserve.core.block_manager import BlockManager


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(num_blocks=16, block_size=4)
    assert bm.allocate("p", 11)  # 3 blocks, the last holds 3 tokens
    parent = bm.block_ids("p")
    copies = bm.fork("p", "c", 10)  # tokens 0..9: blocks 0, 1 full, block 2 partly
    child = bm.block_ids("c")
    assert child[:2] == parent[:2] and child[2] not in parent
    assert copies == [(parent[2], child[2])]
    assert bm.num_used_blocks == 4 and bm.num_shared_blocks_of("c") == 2
    bm.check_invariants()
    # The child grows on its own blocks; the shared ones stay shared.
    assert bm.allocate("c", 13) and bm.block_ids("c")[:3] == child
    assert bm.num_used_blocks == 5
    bm.check_invariants()


def test_fork_on_a_block_boundary_copies_nothing():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("p", 9)
    assert bm.fork("p", "c", 8) == []
    assert bm.block_ids("c") == bm.block_ids("p")[:2]
    assert bm.num_used_blocks == 3
    bm.check_invariants()


def test_shared_blocks_return_with_their_last_owner_and_stay_on_the_device():
    bm = BlockManager(num_blocks=8, block_size=4, num_host_blocks=8)
    bm.allocate("p", 9)
    bm.fork("p", "c1", 8)  # [A, B]
    bm.fork("p", "c2", 6)  # [A, B'], B' a copy of B
    assert bm.swap_out("p") is None and bm.swap_out("c1") is None  # shared: stays
    assert bm.free("p") == 1  # only its own third block returns
    bm.check_invariants()
    assert bm.free("c1") == 1  # B; c2 still holds A
    assert bm.free("c2") == 2  # A and B'

    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_fork_refuses_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate("p", 12)  # every block taken
    assert bm.fork("p", "c", 10) is None  # a copy needs a free block
    assert bm.fork("p", "c", 0) is None
    assert bm.fork("p", "c", 13) is None  # beyond the parent's table
    assert bm.fork("nobody", "c", 4) is None
    assert bm.fork("p", "c", 8) == [] and bm.fork("p", "c", 4) is None  # c holds blocks
    bm.check_invariants()


def test_fork_keeps_the_hidden_cache_mode():
    bm = BlockManager(num_blocks=8, block_size=4, hidden_tokens_per_block=8)
    bm.allocate("p", 20, hidden=True)  # 3 blocks of 8 tokens
    assert len(bm.fork("p", "c", 12)) == 1  # 1 full block, the second copied
    assert bm.is_hidden("c") and len(bm.block_ids("c")) == 2
    bm.check_invariants()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "fork", "free"]), st.integers(0, 5),
                          st.integers(1, 40)), max_size=40))
def test_random_forks_and_frees_keep_the_invariants(ops):
    bm = BlockManager(num_blocks=24, block_size=4)
    for op, who, n in ops:
        name = f"r{who}"
        if op == "alloc":
            bm.allocate(name, n)
        elif op == "fork":
            parent = f"r{(who + 1) % 6}"
            bm.fork(parent, name, min(n, 4 * len(bm.block_ids(parent))))
        else:
            bm.free(name)
        bm.check_invariants()
    for who in range(6):
        bm.free(f"r{who}")
    assert bm.num_free_blocks == 24
