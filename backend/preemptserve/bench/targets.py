"""The policy matrix's targets: ratios to fcfs in the same cell, goodput kept in overload,
apt's SLO attainment, skip_join_mlfq's mean-JCT gain; each cell's checks, met or not."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BASELINE = "fcfs"

# Targets for every policy but fcfs (ratios to fcfs in the same cell) ...
RATIO_TARGETS = (
    # name, ratio key, op, bound
    ("throughput", "output_tokens_per_s", ">=", 0.97),
    ("mean_jct", "mean_jct_s", "<=", 1.05),
    ("p99_jct", "p99_jct_s", "<=", 1.25),
)
# ... goodput at the overload load >= this share of the same policy's at the nominal one ...
GOODPUT_LOADS = (1.0, 1.5)
GOODPUT_SHARE = 0.9
# ... apt's SLO attainment >= fcfs's; skip_join_mlfq's mean-JCT speedup over fcfs
# (fcfs mean JCT / its own) at loads in this range, on heavy-tailed workloads.
MLFQ_POLICY = "skip_join_mlfq"
MLFQ_LOADS = (0.9, 1.0)
MLFQ_SPEEDUP = 2.0


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; 1 when equal (0 / 0 included), None when undefined."""
    if value is None or baseline is None:
        return None
    if value == baseline:
        return 1.0
    return None if baseline == 0 else value / baseline


def _compare(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def _where(cell: Mapping[str, Any]) -> str:
    return f"{cell['profile']}/{cell['regime']}/{cell['workload']} @ {cell['load']:g}x"


def evaluate_targets(
    cells: Sequence[Mapping[str, Any]], heavy: Mapping[str, bool] | None = None
) -> list[dict[str, Any]]:
    """Every target of every cell, met or not (``met`` None where it cannot be evaluated).

    ``cells``: ``{"profile", "regime", "workload", "load", "runs": {policy: {"metrics",
    "ratios"}}}``; ``heavy``: workload -> heavy-tailed (the MLFQ speedup target applies
    only to those; default ``heavy_tailed``).
    """
    if heavy is None:
        from .matrix import WORKLOADS, heavy_tailed  # the matrix's workload table

        heavy = {name: heavy_tailed(name) for name in WORKLOADS}
    out: list[dict[str, Any]] = []

    def add(cell: Mapping[str, Any], policy: str, target: str, value: float | None, op: str,
            bound: float | None, detail: str) -> None:
        met = None if value is None or bound is None else _compare(value, op, bound)
        out.append({
            "target": target, "profile": cell["profile"], "regime": cell["regime"],
            "workload": cell["workload"], "load": cell["load"], "policy": policy,
            "value": value, "op": op, "bound": bound, "met": met,
            "detail": f"{_where(cell)} {policy}: {detail}",
        })

    by_load = {(c["profile"], c["regime"], c["workload"], c["load"]): c for c in cells}
    for cell in cells:
        runs = {p: r for p, r in cell["runs"].items() if "metrics" in r}  # not failed ones
        base = runs.get(BASELINE)
        for policy, run in runs.items():
            if policy == BASELINE or base is None:
                continue
            m, b = run["metrics"], base["metrics"]
            for name, key, op, bound in RATIO_TARGETS:
                value = run["ratios"].get(key)
                add(cell, policy, name, value, op, bound,
                    f"{key} {_num(m[key])} vs fcfs {_num(b[key])} = {_num(value)}x "
                    f"(target {op} {bound})")
            low, high = GOODPUT_LOADS
            if cell["load"] == high:
                nominal = by_load.get((cell["profile"], cell["regime"], cell["workload"], low))
                if nominal is not None and "metrics" in nominal["runs"].get(policy, {}):
                    g_low = nominal["runs"][policy]["metrics"]["goodput_rps"]
                    g_high = m["goodput_rps"]
                    share = ratio(g_high, g_low)
                    value = share if share is not None else (1.0 if g_high is not None
                                                             and g_low == 0 else None)
                    fcfs_share = ratio(b["goodput_rps"],
                                       nominal["runs"][BASELINE].get("metrics", {})
                                       .get("goodput_rps"))
                    add(cell, policy, "goodput_overload", value, ">=", GOODPUT_SHARE,
                        f"goodput {_num(g_high)} req/s at {high:g}x vs {_num(g_low)} at "
                        f"{low:g}x = {_num(value)} (target >= {GOODPUT_SHARE}; fcfs "
                        f"{_num(fcfs_share)})")
            if policy == "apt":
                add(cell, policy, "apt_attainment", m["attainment"], ">=", b["attainment"],
                    f"SLO attainment {_pct(m['attainment'])} vs fcfs {_pct(b['attainment'])} "
                    "(target >= fcfs)")
            is_heavy = heavy.get(cell["workload"], False)
            if policy == MLFQ_POLICY and MLFQ_LOADS[0] <= cell["load"] <= MLFQ_LOADS[1] \
                    and is_heavy:
                value = mlfq_speedup(cell)
                add(cell, policy, "mlfq_speedup", value, ">=", MLFQ_SPEEDUP,
                    f"fcfs mean JCT / {policy}'s = {_num(value)} (target >= {MLFQ_SPEEDUP:g} "
                    "on heavy-tailed workloads)")
    return out


def mlfq_speedup(cell: Mapping[str, Any]) -> float | None:
    r = cell["runs"].get(MLFQ_POLICY, {}).get("ratios", {}).get("mean_jct_s")
    return None if not r else 1.0 / r


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
