"""BlockManager: all-or-nothing allocation, growth, freeing and its invariant checks."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from preemptserve.core.block_manager import BlockManager


def make_manager(num_blocks: int = 8, block_size: int = 4) -> BlockManager:
    return BlockManager(num_blocks=num_blocks, block_size=block_size)


# -- construction and sizing -------------------------------------------------------------


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4), (4, -2)])
def test_rejects_non_positive_sizes(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


@pytest.mark.parametrize(
    "num_tokens, expected", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)]
)
def test_blocks_for_tokens_rounds_up(num_tokens: int, expected: int) -> None:
    assert make_manager(block_size=4).blocks_for_tokens(num_tokens) == expected


def test_fresh_manager_is_all_free() -> None:
    bm = make_manager(num_blocks=5)
    assert bm.num_free_blocks == 5
    assert bm.num_used_blocks == 0
    assert bm.owners() == []
    bm.check_invariants()


# -- allocate ----------------------------------------------------------------------------


def test_allocate_covers_tokens() -> None:
    bm = make_manager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 9)
    table = list(bm.block_ids("a"))
    assert len(table) == 3
    assert len(set(table)) == 3
    assert all(0 <= b < 8 for b in table)
    assert bm.num_free_blocks == 5
    assert bm.has_blocks("a")
    bm.check_invariants()


def test_allocate_is_all_or_nothing() -> None:
    bm = make_manager(num_blocks=4, block_size=4)
    assert bm.allocate("a", 8)  # 2 blocks
    before = (list(bm.block_ids("a")), bm.num_free_blocks)
    assert not bm.can_allocate("b", 12)
    assert not bm.allocate("b", 12)  # needs 3, only 2 free
    assert not bm.has_blocks("b")
    assert list(bm.block_ids("b")) == []
    assert (list(bm.block_ids("a")), bm.num_free_blocks) == before
    # A failed growth leaves the existing table untouched too.
    assert not bm.allocate("a", 8 + 3 * 4)
    assert (list(bm.block_ids("a")), bm.num_free_blocks) == before
    bm.check_invariants()


def test_allocate_exactly_the_whole_pool() -> None:
    bm = make_manager(num_blocks=3, block_size=4)
    assert bm.allocate("a", 12)
    assert bm.num_free_blocks == 0
    assert not bm.allocate("b", 1)
    bm.check_invariants()


def test_growth_adds_blocks_only_at_boundaries() -> None:
    bm = make_manager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 1)
    first = list(bm.block_ids("a"))
    assert len(first) == 1
    for num_tokens in (2, 3, 4):
        assert bm.num_blocks_needed("a", num_tokens) == 0
        assert bm.allocate("a", num_tokens)
        assert list(bm.block_ids("a")) == first
    assert bm.num_blocks_needed("a", 5) == 1
    assert bm.allocate("a", 5)
    table = list(bm.block_ids("a"))
    assert table[:1] == first and len(table) == 2
    # Asking for fewer tokens than covered never shrinks the table.
    assert bm.allocate("a", 1)
    assert list(bm.block_ids("a")) == table
    bm.check_invariants()


def test_block_table_is_a_copy() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    list(bm.block_ids("a")).append(99)
    assert len(list(bm.block_ids("a"))) == 1
    bm.check_invariants()


def test_allocate_zero_tokens_registers_an_empty_table() -> None:
    bm = make_manager()
    assert bm.allocate("a", 0)
    assert list(bm.block_ids("a")) == []
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.free("a") == 0
    bm.check_invariants()


# -- free --------------------------------------------------------------------------------


def test_free_returns_every_block() -> None:
    bm = make_manager(num_blocks=6, block_size=2)
    bm.allocate("a", 5)  # 3 blocks
    bm.allocate("b", 2)  # 1 block
    assert bm.num_free_blocks == 2
    assert bm.free("a") == 3
    assert bm.num_free_blocks == 5
    assert not bm.has_blocks("a")
    assert bm.owners() == ["b"]
    assert bm.free("b") == 1
    assert bm.num_free_blocks == 6
    bm.check_invariants()


def test_freed_blocks_are_reused() -> None:
    bm = make_manager(num_blocks=2, block_size=4)
    bm.allocate("a", 8)
    blocks = set(list(bm.block_ids("a")))
    bm.free("a")
    assert bm.allocate("b", 8)
    assert set(list(bm.block_ids("b"))) == blocks
    bm.check_invariants()


def test_free_unknown_or_twice_is_a_no_op() -> None:
    bm = make_manager()
    assert bm.free("nobody") == 0
    bm.allocate("a", 4)
    assert bm.free("a") == 1
    assert bm.free("a") == 0
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


def test_double_free_of_a_block_is_detected() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    (block_id,) = list(bm.block_ids("a"))
    # Simulate a bookkeeping bug: the block's count already dropped to zero.
    bm._ref_counts[block_id] = 0
    with pytest.raises(AssertionError, match="double free"):
        bm.free("a")


# -- check_invariants catches corruption --------------------------------------------------


def test_invariants_catch_block_in_free_list_twice() -> None:
    bm = make_manager()
    bm._free.append(bm._free[0])
    with pytest.raises(AssertionError, match="twice"):
        bm.check_invariants()


def test_invariants_catch_wrong_ref_count() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    (block_id,) = list(bm.block_ids("a"))
    bm._ref_counts[block_id] = 2
    with pytest.raises(AssertionError, match="ref count"):
        bm.check_invariants()


def test_invariants_catch_block_owned_twice() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    bm._tables["b"] = list(bm._tables["a"])  # shared without a ref count bump
    with pytest.raises(AssertionError):
        bm.check_invariants()


def test_invariants_catch_owned_block_still_free() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    (block_id,) = list(bm.block_ids("a"))
    bm._free.append(block_id)
    with pytest.raises(AssertionError):
        bm.check_invariants()


def test_invariants_catch_table_dropped_without_free() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    del bm._tables["a"]  # the block keeps its ref count but has no owner
    with pytest.raises(AssertionError, match="ref count"):
        bm.check_invariants()


def test_invariants_catch_leak() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    (block_id,) = list(bm.block_ids("a"))
    del bm._tables["a"]
    bm._ref_counts[block_id] = 0  # neither owned nor free
    with pytest.raises(AssertionError, match="leak"):
        bm.check_invariants()


# -- stateful property test --------------------------------------------------------------

REQUEST_IDS = [f"r{i}" for i in range(12)]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / grow / free against a model of each request's token count."""

    @initialize(num_blocks=st.integers(1, 24), block_size=st.integers(1, 8))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)
        self.covered: dict[str, int] = {}  # request id -> tokens its table covers

    def _expected_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.bm.block_size)

    @rule(request_id=st.sampled_from(REQUEST_IDS), num_tokens=st.integers(0, 120))
    def allocate(self, request_id: str, num_tokens: int) -> None:
        old_table = list(self.bm.block_ids(request_id))
        num_free = self.bm.num_free_blocks
        needed = max(0, self._expected_blocks(num_tokens) - len(old_table))
        assert self.bm.can_allocate(request_id, num_tokens) == (needed <= num_free)
        ok = self.bm.allocate(request_id, num_tokens)
        assert ok == (needed <= num_free)
        new_table = list(self.bm.block_ids(request_id))
        if ok:
            assert new_table[: len(old_table)] == old_table
            assert len(new_table) == len(old_table) + needed
            assert self.bm.num_free_blocks == num_free - needed
            self.covered[request_id] = max(self.covered.get(request_id, 0), num_tokens)
        else:
            assert new_table == old_table
            assert self.bm.num_free_blocks == num_free

    @precondition(lambda self: bool(self.covered))
    @rule(data=st.data(), extra_tokens=st.integers(1, 20))
    def grow(self, data: st.DataObject, extra_tokens: int) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.covered)))
        self.allocate(request_id, self.covered[request_id] + extra_tokens)

    @rule(request_id=st.sampled_from(REQUEST_IDS))
    def free(self, request_id: str) -> None:
        num_owned = len(list(self.bm.block_ids(request_id)))
        num_free = self.bm.num_free_blocks
        assert self.bm.free(request_id) == num_owned
        assert self.bm.num_free_blocks == num_free + num_owned
        assert not self.bm.has_blocks(request_id)
        self.covered.pop(request_id, None)

    @invariant()
    def consistent(self) -> None:
        self.bm.check_invariants()
        for request_id, num_tokens in self.covered.items():
            assert len(list(self.bm.block_ids(request_id))) == self._expected_blocks(num_tokens)
        assert sorted(self.bm.owners()) == sorted(self.covered)
        owned = sum(len(list(self.bm.block_ids(r))) for r in self.bm.owners())
        assert owned == self.bm.num_used_blocks

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for request_id in self.bm.owners():
            self.bm.free(request_id)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks, "blocks leaked"


BlockManagerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
TestBlockManagerMachine = BlockManagerMachine.TestCase


def test_block_ids_is_a_snapshot_of_the_table() -> None:
    # block_ids hands out the table itself (no copy per step): growing it makes a new one.
    bm = make_manager()
    bm.allocate("a", 4)
    before = bm.block_ids("a")
    assert bm.block_ids("a") is before  # no new block: the same table
    bm.allocate("a", 5)
    assert len(before) == 1 and len(bm.block_ids("a")) == 2
    assert bm.block_ids("a")[:1] == before
