"""BlockManager's seams for moving requests between engines: pins and reservations."""

from __future__ import annotations

import pytest

from preemptserve.core.block_manager import BlockManager


def manager(num_host_blocks: int = 8) -> BlockManager:
    return BlockManager(num_blocks=8, block_size=4, num_host_blocks=num_host_blocks,
                        hidden_tokens_per_block=8)


def test_reserve_extend_adopt() -> None:
    bm = manager()
    first = bm.reserve("r", 2)
    more = bm.reserve("r", 1)
    assert first is not None and more is not None
    assert bm.reserved_blocks("r") == (*first, *more)
    assert bm.num_free_blocks == 5 and not bm.has_blocks("r")
    bm.check_invariants()
    assert bm.adopt("r") == (*first, *more)
    assert bm.block_ids("r") == (*first, *more) and bm.reserved_blocks("r") == ()
    assert bm.allocate("r", 13)  # grows like any table: a fourth block
    assert bm.num_device_blocks_of("r") == 4
    bm.check_invariants()
    bm.free("r")
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_reserve_is_all_or_nothing_and_release_returns_everything() -> None:
    bm = manager()
    assert bm.reserve("r", 9) is None and bm.num_free_blocks == 8
    assert bm.reserve("r", 6) is not None
    assert bm.reserve("r", 3) is None and len(bm.reserved_blocks("r")) == 6
    assert bm.reserve("r", 4, on_host=True) is not None
    assert bm.num_free_host_blocks == 4
    bm.check_invariants()
    assert bm.release_reservation("r") == 10
    assert bm.num_free_blocks == 8 and bm.num_free_host_blocks == 8
    bm.check_invariants()


def test_adopt_on_the_host_tier_then_swap_in() -> None:
    bm = manager()
    host = bm.reserve("r", 2, on_host=True)
    assert host is not None
    bm.adopt("r", hidden=True, on_host=True)
    assert bm.is_on_host("r") and bm.is_hidden("r") and bm.host_block_ids("r") == tuple(host)
    pairs = bm.swap_in("r")
    assert pairs is not None and [h for h, _ in pairs] == host
    assert bm.allocate("r", 24, hidden=True)  # 3 hidden blocks of 8 tokens
    bm.check_invariants()
    bm.free("r")
    bm.commit_pending()
    assert bm.num_free_blocks == 8 and bm.num_free_host_blocks == 8


def test_a_pinned_request_s_blocks_are_not_reused_until_unpinned() -> None:
    bm = manager()
    assert bm.allocate("r", 8)  # 2 blocks
    pinned = set(bm.block_ids("r"))
    bm.pin("r")
    bm.free("r")  # finished (or cancelled) while its blocks are being sent
    assert bm.num_free_blocks == 6
    bm.check_invariants()
    assert bm.allocate("other", 24)  # the 6 free blocks; the pinned ones stay out
    assert not pinned & set(bm.block_ids("other"))
    assert not bm.allocate("other", 28)
    bm.unpin("r")
    assert bm.num_free_blocks == 2 and bm.allocate("other", 32)
    bm.check_invariants()


def test_pins_hold_blocks_a_swap_vacates_in_either_direction() -> None:
    bm = manager()
    assert bm.allocate("r", 8)
    device = set(bm.block_ids("r"))
    bm.pin("r")
    assert bm.swap_out("r", reuse_now=True) is not None
    bm.commit_pending()
    assert bm.num_free_blocks == 6, "swapped-out device blocks stay pinned"
    bm.check_invariants()
    bm.unpin("r")
    assert bm.num_free_blocks == 8
    host = set(bm.host_block_ids("r"))
    bm.pin("r")
    assert bm.swap_in("r") is not None
    bm.commit_pending()
    assert bm.num_free_host_blocks == 6, "swapped-in host blocks stay pinned"
    assert bm.allocate("o", 24) and bm.swap_out("o", reuse_now=True) is not None
    assert not host & set(bm.host_block_ids("o")), "a pinned host block was reused"
    bm.check_invariants()
    bm.unpin("r")
    assert bm.num_free_host_blocks == 2
    bm.free("r")
    bm.free("o")
    assert bm.num_free_blocks == 8 and bm.num_free_host_blocks == 8
    assert device and host  # the request held blocks in each tier in turn
    bm.check_invariants()


def test_misuse_fails_clearly() -> None:
    bm = manager()
    bm.pin("r")
    with pytest.raises(ValueError, match="pinned already"):
        bm.pin("r")
    bm.unpin("r")
    with pytest.raises(ValueError, match="no reservation"):
        bm.adopt("r")
    assert bm.allocate("r", 4)
    with pytest.raises(ValueError, match="holds blocks already"):
        bm.reserve("r", 1)
    bm.free("r")
    bm.check_invariants()
