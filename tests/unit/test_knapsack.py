"""apt's batch choice: the greedy multiple-choice knapsack against a brute-force optimum."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from preemptserve.core.scheduler.knapsack import Option, _hull_general, _hull_of_two, choose


def brute_force_optimum(candidates: dict[str, list[Option]], capacity: int) -> float:
    """Best total value over every assignment (no option, or one of each candidate's)."""
    keys = list(candidates)
    # Column j of every row: the option index of candidate j, or -1 for "not served".
    choices = np.array(list(itertools.product(
        *[range(-1, len(candidates[k])) for k in keys])), dtype=np.int64).reshape(-1, len(keys))
    blocks = np.zeros(len(choices))
    values = np.zeros(len(choices))
    for j, key in enumerate(keys):
        table_blocks = np.array([0] + [o.num_blocks for o in candidates[key]])
        table_values = np.array([0.0] + [o.value for o in candidates[key]])
        blocks += table_blocks[choices[:, j] + 1]
        values += table_values[choices[:, j] + 1]
    return float(values[blocks <= capacity].max())


@st.composite
def instances(draw: st.DrawFn) -> tuple[dict[str, list[Option]], int]:
    """Up to 10 requests with a KV option (m blocks, value p) and maybe a hidden one."""
    num = draw(st.integers(1, 10))
    candidates = {}
    for i in range(num):
        kv_blocks = draw(st.integers(1, 24))
        pending_s = draw(st.floats(0.0, 10.0))
        options = [Option("kv", kv_blocks, pending_s)]
        if draw(st.booleans()):
            penalty = draw(st.floats(0.0, 10.0))
            options.append(Option("hidden", -(-kv_blocks // 2), pending_s - penalty))
        candidates[f"r{i}"] = options
    return candidates, draw(st.integers(0, 64))


@settings(max_examples=400, deadline=None)
@given(instances())
def test_greedy_is_within_half_of_the_optimum_and_within_budget(instance) -> None:
    candidates, capacity = instance
    selection = choose(candidates, capacity)
    assert selection.num_blocks <= capacity
    assert selection.num_blocks == sum(o.num_blocks for o in selection.chosen.values())
    assert abs(selection.value - sum(o.value for o in selection.chosen.values())) < 1e-9
    for key, option in selection.chosen.items():
        assert option in candidates[key]
        assert option.value > 0
    assert selection.value >= brute_force_optimum(candidates, capacity) / 2 - 1e-9


def test_prefers_hidden_mode_when_memory_is_the_limit() -> None:
    # Two requests of 4 KV blocks, 5 blocks free: only hidden mode serves both.
    candidates = {
        "a": [Option("kv", 4, 1.0), Option("hidden", 2, 0.9)],
        "b": [Option("kv", 4, 1.0), Option("hidden", 2, 0.9)],
    }
    selection = choose(candidates, 5)
    assert {k: o.mode for k, o in selection.chosen.items()} == {"a": "hidden", "b": "hidden"}


def test_upgrades_to_kv_mode_when_memory_allows() -> None:
    candidates = {
        "a": [Option("kv", 4, 1.0), Option("hidden", 2, 0.9)],
        "b": [Option("kv", 4, 1.0), Option("hidden", 2, 0.9)],
    }
    assert {o.mode for o in choose(candidates, 8).chosen.values()} == {"kv"}
    # 6 blocks: one upgrade fits (the first candidate on a tie in gain).
    modes = {k: o.mode for k, o in choose(candidates, 6).chosen.items()}
    assert modes == {"a": "kv", "b": "hidden"}


def test_falls_back_to_the_best_single_request() -> None:
    # Greedy by gain takes the small item first and then cannot fit the big one.
    candidates = {"small": [Option("kv", 1, 2.0)], "big": [Option("kv", 10, 10.0)]}
    selection = choose(candidates, 10)
    assert list(selection.chosen) == ["big"]
    assert selection.value == 10.0


def test_options_that_cannot_help_are_never_chosen() -> None:
    candidates = {
        "negative": [Option("hidden", 1, -1.0)],
        "too_big": [Option("kv", 9, 5.0)],
        "zero": [Option("kv", 1, 0.0)],
    }
    assert choose(candidates, 8).chosen == {}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.floats(-5.0, 5.0)), min_size=2, max_size=2),
       st.integers(0, 12))
def test_the_two_option_shortcut_builds_the_general_hull(pairs, capacity) -> None:
    options = [Option(i, blocks, value) for i, (blocks, value) in enumerate(pairs)]
    assert _hull_of_two(options, capacity) == _hull_general(options, capacity)
