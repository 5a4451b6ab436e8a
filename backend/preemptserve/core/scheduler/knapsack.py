"""Apt-Serve's batch composition: a multiple-choice knapsack solved greedily. No torch.

Each candidate request may be served in one of a few ways (an ``Option``: KV mode or
hidden mode, each with its memory in blocks and its value), or not at all; the chosen
options must fit ``capacity`` blocks, and the total value should be as large as possible.

The greedy (Apt-Serve, Algorithm 1, after Sinha and Zoltners' LP bound for the
multiple-choice knapsack):

1. Per candidate, keep the options that fit alone and have positive value, and take their
   upper convex hull from (0 blocks, 0 value): a hull step is either the first option
   ("serve in hidden mode", gain = value / blocks) or the upgrade to the next option
   ("hidden -> KV", gain = extra value / extra blocks). Dominated options drop out.
2. Take hull steps in decreasing gain, each only if it fits and its candidate's previous
   step was taken (an upgrade needs its base).
3. Also consider the single most valuable option; return whichever of the two is worth more.

Why this is a 2-approximation: the LP relaxation of the problem takes the hull steps in
gain order and a fraction of the first one that does not fit (the split step), so
``OPT <= LP <= greedy prefix + split step``. Step 2 takes at least the prefix, and the split
step's value is at most its option's full value, which fits alone and so is bounded by
step 3. Hence ``max(step 2, step 3) >= OPT / 2``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple


class Option(NamedTuple):
    """One way to serve a candidate: its memory (blocks) and the value of serving it.

    (A named tuple: thousands are built per iteration.)
    """

    mode: Hashable
    num_blocks: int
    value: float


@dataclass(frozen=True)
class Selection:
    chosen: dict[Hashable, Option]  # candidate key -> its option
    value: float
    num_blocks: int


def _hull(options: Sequence[Option], capacity: int) -> list[Option]:
    """Options on the upper convex hull from the origin, by increasing blocks."""
    if len(options) == 1:  # the common cases, without the general search
        (only,) = options
        return [only] if only.value > 0 and only.num_blocks <= capacity else []
    if len(options) == 2:
        return _hull_of_two(options, capacity)
    return _hull_general(options, capacity)


def _hull_of_two(options: Sequence[Option], capacity: int) -> list[Option]:
    small, large = sorted(options, key=lambda o: (o.num_blocks, -o.value))
    small_ok = small.value > 0 and small.num_blocks <= capacity
    if not (large.value > 0 and large.num_blocks <= capacity):
        return [small] if small_ok else []
    if not small_ok or large.value <= small.value:  # one of them is never worth it
        return [small] if small_ok and small.value >= large.value else [large]
    if large.num_blocks == small.num_blocks:
        return [large]
    # The smaller option is a step of its own if it gains at least what the upgrade does
    # per block (compared by cross-multiplying: no division by zero blocks).
    upgrade_blocks = large.num_blocks - small.num_blocks
    if (large.value - small.value) * small.num_blocks <= small.value * upgrade_blocks:
        return [small, large]
    return [large]


def _hull_general(options: Sequence[Option], capacity: int) -> list[Option]:
    usable = sorted((o for o in options if o.value > 0 and o.num_blocks <= capacity),
                    key=lambda o: (o.num_blocks, -o.value))
    hull: list[Option] = []
    blocks, value = 0, 0.0
    while True:
        best: Option | None = None
        best_gain = 0.0
        for option in usable:
            extra_blocks = option.num_blocks - blocks
            extra_value = option.value - value
            if extra_value <= 0 or extra_blocks < 0:
                continue
            # A free improvement (no extra blocks) always wins.
            gain = float("inf") if extra_blocks == 0 else extra_value / extra_blocks
            if best is None or gain > best_gain:
                best, best_gain = option, gain
        if best is None:
            return hull
        if hull and best.num_blocks == blocks:
            hull[-1] = best  # same memory, more value: replace the step
        else:
            hull.append(best)
        blocks, value = best.num_blocks, best.value


def choose(candidates: Mapping[Hashable, Sequence[Option]], capacity: int) -> Selection:
    """At most one option per candidate, within ``capacity`` blocks; >= OPT / 2 in value.

    Deterministic: ties in gain go to the candidate that comes first in ``candidates``.
    """
    steps: list[tuple[float, int, int, Hashable, Option]] = []
    best_single: tuple[Hashable, Option] | None = None
    for order, (key, options) in enumerate(candidates.items()):
        hull = _hull(options, capacity)
        prev_blocks, prev_value = 0, 0.0
        for level, option in enumerate(hull):
            extra_blocks = option.num_blocks - prev_blocks
            extra_value = option.value - prev_value
            gain = float("inf") if extra_blocks == 0 else extra_value / extra_blocks
            steps.append((-gain, order, level, key, option))
            prev_blocks, prev_value = option.num_blocks, option.value
        if hull:
            top = max(hull, key=lambda o: o.value)
            if best_single is None or top.value > best_single[1].value:
                best_single = (key, top)
    steps.sort(key=lambda s: s[:3])

    chosen: dict[Hashable, Option] = {}
    levels: dict[Hashable, int] = {}
    used = 0
    for _, _, level, key, option in steps:
        if levels.get(key, -1) != level - 1:
            continue  # its base step was not taken
        held = chosen[key].num_blocks if key in chosen else 0
        if used - held + option.num_blocks > capacity:
            continue
        used += option.num_blocks - held
        chosen[key] = option
        levels[key] = level
    value = sum(o.value for o in chosen.values())
    if best_single is not None and best_single[1].value > value:
        key, option = best_single
        return Selection({key: option}, option.value, option.num_blocks)
    return Selection(chosen, value, used)
