"""BlockManager's two tiers: swap plans, tier membership and pending frees.

A swap vacates blocks whose copy may still be in flight, so they stay *pending* until
``commit_pending()`` (or are free at once with ``reuse_now``). Every test ends with
``check_invariants()``, which covers both tiers.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from preemptserve.core.block_manager import BlockManager


def make_manager(
    num_blocks: int = 8, block_size: int = 4, num_host_blocks: int = 8
) -> BlockManager:
    return BlockManager(num_blocks, block_size, num_host_blocks=num_host_blocks)


def snapshot(bm: BlockManager) -> tuple:
    """Everything observable, to assert that a refused operation changed nothing."""
    return (
        {r: list(bm.block_ids(r)) for r in bm.device_owners()},
        {r: bm.num_host_blocks_of(r) for r in bm.host_owners()},
        bm.num_free_blocks,
        bm.num_pending_blocks,
        bm.num_free_host_blocks,
        bm.num_used_host_blocks,
    )


# -- construction ------------------------------------------------------------------------


def test_rejects_negative_host_pool() -> None:
    with pytest.raises(ValueError):
        BlockManager(4, 4, num_host_blocks=-1)


def test_fresh_host_tier_is_all_free() -> None:
    bm = make_manager(num_host_blocks=5)
    assert bm.num_free_host_blocks == 5 and bm.num_used_host_blocks == 0
    assert bm.host_owners() == [] and bm.num_pending_blocks == 0
    bm.check_invariants()


# -- swap_out ----------------------------------------------------------------------------


def test_swap_out_pairs_each_device_block_with_a_host_block() -> None:
    bm = make_manager()
    assert bm.allocate("a", 10)  # 3 blocks
    table = list(bm.block_ids("a"))
    pairs = bm.swap_out("a")
    assert pairs is not None
    assert [device for device, _ in pairs] == table  # logical order kept
    host_ids = [host for _, host in pairs]
    assert len(set(host_ids)) == 3 and all(0 <= h < bm.num_host_blocks for h in host_ids)
    assert bm.is_on_host("a") and not bm.has_blocks("a")
    assert bm.num_host_blocks_of("a") == 3 and bm.num_device_blocks_of("a") == 0
    assert bm.host_owners() == ["a"] and bm.device_owners() == []
    assert bm.owners() == ["a"]
    assert bm.num_used_host_blocks == 3 and bm.num_free_host_blocks == 5
    bm.check_invariants()


def test_swapped_out_blocks_are_pending_until_commit() -> None:
    bm = make_manager(num_blocks=4)
    assert bm.allocate("a", 16)  # the whole device pool
    table = list(bm.block_ids("a"))
    assert bm.swap_out("a") is not None
    assert bm.num_pending_blocks == 4 and bm.num_free_blocks == 0
    assert not bm.can_allocate("b", 1)
    assert not bm.allocate("b", 1)
    bm.check_invariants()
    bm.commit_pending()
    assert bm.num_pending_blocks == 0 and bm.num_free_blocks == 4
    assert bm.allocate("b", 16)
    assert sorted(list(bm.block_ids("b"))) == sorted(table)
    bm.check_invariants()


def test_reuse_now_frees_the_device_blocks_at_once() -> None:
    bm = make_manager(num_blocks=4)
    assert bm.allocate("a", 16)
    assert bm.swap_out("a", reuse_now=True) is not None
    assert bm.num_pending_blocks == 0 and bm.num_free_blocks == 4
    assert bm.allocate("b", 16)
    bm.check_invariants()


def test_commit_pending_twice_changes_nothing_more() -> None:
    bm = make_manager()
    bm.allocate("a", 8)
    bm.swap_out("a")
    bm.commit_pending()
    before = snapshot(bm)
    bm.commit_pending()
    assert snapshot(bm) == before
    bm.check_invariants()


def test_swap_out_refuses_when_the_host_is_full() -> None:
    bm = make_manager(num_blocks=8, num_host_blocks=3)
    bm.allocate("a", 8)  # 2 blocks
    bm.allocate("b", 8)
    assert bm.swap_out("a") is not None  # 1 host block left
    before = snapshot(bm)
    assert bm.swap_out("b") is None
    assert snapshot(bm) == before
    assert bm.has_blocks("b") and not bm.is_on_host("b")
    bm.check_invariants()


def test_swap_out_refuses_without_a_host_tier() -> None:
    bm = make_manager(num_host_blocks=0)
    bm.allocate("a", 4)
    before = snapshot(bm)
    assert bm.swap_out("a") is None
    assert snapshot(bm) == before
    bm.check_invariants()


@pytest.mark.parametrize("case", ["unknown", "empty table", "already on host"])
def test_swap_out_refuses_a_request_without_device_blocks(case: str) -> None:
    bm = make_manager()
    bm.allocate("other", 4)
    if case == "empty table":
        assert bm.allocate("a", 0)
    elif case == "already on host":
        bm.allocate("a", 4)
        assert bm.swap_out("a") is not None
    before = snapshot(bm)
    assert bm.swap_out("a") is None
    assert bm.swap_out("a", reuse_now=True) is None
    assert snapshot(bm) == before
    bm.check_invariants()


def test_swap_out_refuses_shared_blocks() -> None:
    bm = make_manager()
    bm.allocate("a", 8)
    shared = list(bm.block_ids("a"))[0]
    # No public sharing API yet: share the way a prefix cache would, with a ref count.
    bm._tables["b"] = [shared]
    bm._ref_counts[shared] += 1
    bm.check_invariants()
    before = snapshot(bm)
    assert bm.swap_out("a") is None
    assert snapshot(bm) == before
    bm.check_invariants()


# -- swap_in -----------------------------------------------------------------------------


def test_swap_in_pairs_each_host_block_with_a_device_block() -> None:
    bm = make_manager()
    bm.allocate("a", 10)
    out_pairs = bm.swap_out("a")
    assert out_pairs is not None
    bm.commit_pending()
    in_pairs = bm.swap_in("a")
    assert in_pairs is not None
    # Logical block i comes back from the host block it went to.
    assert [host for host, _ in in_pairs] == [host for _, host in out_pairs]
    assert [device for _, device in in_pairs] == list(bm.block_ids("a"))
    assert bm.has_blocks("a") and not bm.is_on_host("a")
    assert bm.device_owners() == ["a"] and bm.host_owners() == []
    assert bm.num_free_blocks == 8 - 3
    bm.check_invariants()


def test_host_blocks_vacated_by_swap_in_are_pending_until_commit() -> None:
    bm = make_manager(num_blocks=8, num_host_blocks=2)
    bm.allocate("a", 8)  # 2 blocks: the whole host tier once swapped
    bm.allocate("b", 8)
    assert bm.swap_out("a") is not None
    bm.commit_pending()
    assert bm.swap_in("a") is not None
    assert bm.num_free_host_blocks == 0  # their copy back may still be in flight
    assert bm.swap_out("b") is None
    bm.check_invariants()
    bm.commit_pending()
    assert bm.num_free_host_blocks == 2
    assert bm.swap_out("b") is not None
    bm.check_invariants()


def test_swap_in_refuses_when_the_device_is_short() -> None:
    bm = make_manager(num_blocks=4)
    bm.allocate("a", 12)  # 3 blocks
    assert bm.swap_out("a", reuse_now=True) is not None
    bm.allocate("b", 8)  # 2 of 4 device blocks taken: a's 3 do not fit
    before = snapshot(bm)
    assert bm.swap_in("a") is None
    assert snapshot(bm) == before
    bm.free("b")
    assert bm.swap_in("a") is not None
    bm.check_invariants()


def test_swap_in_refuses_a_request_not_on_the_host() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    before = snapshot(bm)
    assert bm.swap_in("a") is None
    assert bm.swap_in("nobody") is None
    assert snapshot(bm) == before
    bm.check_invariants()


def test_round_trip_then_growth_keeps_the_table_prefix() -> None:
    bm = make_manager()
    bm.allocate("a", 6)  # 2 blocks
    bm.swap_out("a")
    bm.commit_pending()
    bm.swap_in("a")
    table = list(bm.block_ids("a"))
    assert bm.num_blocks_needed("a", 9) == 1
    assert bm.allocate("a", 9)
    assert list(bm.block_ids("a"))[:2] == table and len(list(bm.block_ids("a"))) == 3
    bm.check_invariants()


# -- free across tiers -------------------------------------------------------------------


def test_free_of_a_request_on_the_host_returns_its_host_blocks() -> None:
    bm = make_manager(num_host_blocks=4)
    bm.allocate("a", 12)  # 3 blocks
    bm.swap_out("a")
    assert bm.num_free_host_blocks == 1
    assert bm.free("a") == 0  # no device blocks were freed
    assert bm.num_free_host_blocks == 4  # at once: nothing is in flight from it
    assert not bm.is_on_host("a") and bm.owners() == []
    bm.check_invariants()
    bm.commit_pending()
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


def test_free_after_swap_in_leaves_the_pending_host_blocks_pending() -> None:
    bm = make_manager(num_host_blocks=4)
    bm.allocate("a", 12)
    bm.swap_out("a", reuse_now=True)
    bm.swap_in("a")
    assert bm.free("a") == 3
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.num_free_host_blocks == 1  # 3 still pending
    bm.check_invariants()
    bm.commit_pending()
    assert bm.num_free_host_blocks == 4
    bm.check_invariants()


# -- check_invariants covers the host tier -----------------------------------------------


def test_invariants_catch_a_host_block_owned_twice() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    bm.swap_out("a")
    bm._host_tables["b"] = list(bm._host_tables["a"])
    with pytest.raises(AssertionError, match="host tier"):
        bm.check_invariants()


def test_invariants_catch_a_host_leak() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    bm.swap_out("a")
    del bm._host_tables["a"]
    with pytest.raises(AssertionError, match="host tier"):
        bm.check_invariants()


def test_invariants_catch_a_request_in_both_tiers() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    bm.allocate("b", 4)
    bm.swap_out("b")
    bm._tables["b"] = bm._tables.pop("a")
    with pytest.raises(AssertionError, match="both tiers"):
        bm.check_invariants()


def test_invariants_catch_a_pending_block_that_is_also_free() -> None:
    bm = make_manager()
    bm.allocate("a", 4)
    bm.swap_out("a")
    bm._free.append(bm._pending_free[0])
    with pytest.raises(AssertionError, match="pending"):
        bm.check_invariants()


# -- stateful property test --------------------------------------------------------------

REQUEST_IDS = [f"r{i}" for i in range(5)]


class TieredBlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / grow / swap_out / swap_in / commit / free against a model.

    The model tracks each request's covered tokens and tier, and how many blocks of each
    tier are pending; free counts must follow from it exactly.
    """

    @initialize(
        num_blocks=st.integers(1, 16),
        block_size=st.integers(1, 4),
        num_host_blocks=st.integers(0, 16),
    )
    def setup(self, num_blocks: int, block_size: int, num_host_blocks: int) -> None:
        self.bm = BlockManager(num_blocks, block_size, num_host_blocks=num_host_blocks)
        self.covered: dict[str, int] = {}  # request id -> tokens its table covers
        self.on_host: set[str] = set()
        self.num_pending = 0
        self.num_pending_host = 0

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.bm.block_size)

    def _on_device(self) -> list[str]:
        return sorted(set(self.covered) - self.on_host)

    @rule(request_id=st.sampled_from(REQUEST_IDS), num_tokens=st.integers(0, 24))
    def allocate(self, request_id: str, num_tokens: int) -> None:
        if request_id in self.on_host:
            return  # a swapped-out request is swapped in before it grows
        have = len(list(self.bm.block_ids(request_id)))
        num_free = self.bm.num_free_blocks
        needed = max(0, self._blocks(num_tokens) - have)
        ok = self.bm.allocate(request_id, num_tokens)
        assert ok == (needed <= num_free)
        if ok:
            assert self.bm.num_free_blocks == num_free - needed
            self.covered[request_id] = max(self.covered.get(request_id, 0), num_tokens)

    @precondition(lambda self: bool(self._on_device()))
    @rule(data=st.data(), extra_tokens=st.integers(1, 8))
    def grow(self, data: st.DataObject, extra_tokens: int) -> None:
        request_id = data.draw(st.sampled_from(self._on_device()))
        self.allocate(request_id, self.covered[request_id] + extra_tokens)

    @precondition(lambda self: bool(self._on_device()))
    @rule(data=st.data(), reuse_now=st.booleans())
    def swap_out_resident(self, data: st.DataObject, reuse_now: bool) -> None:
        self.swap_out(data.draw(st.sampled_from(self._on_device())), reuse_now)

    @rule(request_id=st.sampled_from(REQUEST_IDS), reuse_now=st.booleans())
    def swap_out(self, request_id: str, reuse_now: bool) -> None:
        table = list(self.bm.block_ids(request_id))
        num_free, num_free_host = self.bm.num_free_blocks, self.bm.num_free_host_blocks
        pairs = self.bm.swap_out(request_id, reuse_now=reuse_now)
        expect_ok = (
            request_id in self.covered
            and request_id not in self.on_host
            and 0 < len(table) <= num_free_host
        )
        assert (pairs is not None) == expect_ok
        if pairs is None:
            return
        assert [device for device, _ in pairs] == table
        assert self.bm.num_free_host_blocks == num_free_host - len(table)
        if reuse_now:
            assert self.bm.num_free_blocks == num_free + len(table)
        else:
            assert self.bm.num_free_blocks == num_free
            self.num_pending += len(table)
        self.on_host.add(request_id)

    @precondition(lambda self: bool(self.on_host))
    @rule(data=st.data())
    def swap_in(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.on_host)))
        num_host = self.bm.num_host_blocks_of(request_id)
        num_free = self.bm.num_free_blocks
        pairs = self.bm.swap_in(request_id)
        assert (pairs is not None) == (num_host <= num_free)
        if pairs is None:
            return
        assert len(pairs) == num_host == self._blocks(self.covered[request_id])
        assert [device for _, device in pairs] == list(self.bm.block_ids(request_id))
        assert self.bm.num_free_blocks == num_free - num_host
        self.num_pending_host += num_host
        self.on_host.discard(request_id)

    @rule()
    def commit(self) -> None:
        num_free, num_free_host = self.bm.num_free_blocks, self.bm.num_free_host_blocks
        self.bm.commit_pending()
        assert self.bm.num_free_blocks == num_free + self.num_pending
        assert self.bm.num_free_host_blocks == num_free_host + self.num_pending_host
        self.num_pending = self.num_pending_host = 0

    @rule(request_id=st.sampled_from(REQUEST_IDS))
    def free(self, request_id: str) -> None:
        num_device = len(list(self.bm.block_ids(request_id)))
        assert self.bm.free(request_id) == num_device
        assert not self.bm.has_blocks(request_id) and not self.bm.is_on_host(request_id)
        self.covered.pop(request_id, None)
        self.on_host.discard(request_id)

    @invariant()
    def consistent(self) -> None:
        bm = self.bm
        bm.check_invariants()
        assert sorted(bm.device_owners()) == self._on_device()
        assert sorted(bm.host_owners()) == sorted(self.on_host)
        for request_id, num_tokens in self.covered.items():
            if request_id in self.on_host:
                assert bm.num_host_blocks_of(request_id) == self._blocks(num_tokens)
                assert not bm.has_blocks(request_id)
            else:
                assert bm.num_device_blocks_of(request_id) == self._blocks(num_tokens)
        num_device = sum(bm.num_device_blocks_of(r) for r in bm.device_owners())
        num_host = sum(bm.num_host_blocks_of(r) for r in bm.host_owners())
        assert bm.num_pending_blocks == self.num_pending
        assert bm.num_free_blocks == bm.num_blocks - num_device - self.num_pending
        assert bm.num_free_host_blocks == (
            bm.num_host_blocks - num_host - self.num_pending_host
        )

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for request_id in self.bm.owners():
            self.bm.free(request_id)
        self.bm.commit_pending()
        self.bm.check_invariants()
        assert self.bm.owners() == []
        assert self.bm.num_free_blocks == self.bm.num_blocks, "device blocks leaked"
        assert self.bm.num_free_host_blocks == self.bm.num_host_blocks, "host blocks leaked"


TieredBlockManagerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
TestTieredBlockManagerMachine = TieredBlockManagerMachine.TestCase
