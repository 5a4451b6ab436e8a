"""The simulator's event order: (time, kind, insertion order)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from preemptserve.sim.events import EventKind, EventQueue


def drain(q: EventQueue) -> list[tuple[float, EventKind, object]]:
    out = []
    while q:
        out.append(q.pop())
    return out


def test_same_time_iteration_end_then_arrival_then_step() -> None:
    q = EventQueue()
    q.push(1.0, EventKind.STEP, "step")
    q.push(1.0, EventKind.ARRIVAL, "arrival")
    q.push(1.0, EventKind.ITERATION_END, "end")
    q.push(0.5, EventKind.STEP, "early step")
    assert [p for _, _, p in drain(q)] == ["early step", "end", "arrival", "step"]


def test_equal_keys_pop_in_insertion_order_without_comparing_payloads() -> None:
    q = EventQueue()
    payloads = [object(), {"a": 1}, [1], None]  # not mutually comparable
    for p in payloads:
        q.push(2.0, EventKind.ARRIVAL, p)
    assert [p for _, _, p in drain(q)] == payloads


def test_peek_and_len() -> None:
    q = EventQueue()
    assert q.peek_time_s() is None and len(q) == 0
    q.push(3.0, EventKind.ARRIVAL)
    q.push(1.0, EventKind.STEP)
    assert q.peek_time_s() == 1.0 and len(q) == 2


@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.sampled_from(list(EventKind))),
        max_size=60,
    )
)
def test_pop_order_is_sorted_by_time_kind_then_push_order(items: list) -> None:
    q = EventQueue()
    for seq, (t, kind) in enumerate(items):
        q.push(t, kind, seq)
    popped = [(t, int(k), seq) for t, k, seq in drain(q)]
    assert popped == sorted((t, int(k), seq) for seq, (t, k) in enumerate(items))
