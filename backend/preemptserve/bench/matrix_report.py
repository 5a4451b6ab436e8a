"""The policy matrix's report: its Markdown tables and its plot (``bench/matrix.py`` runs it;
``report.markdown`` adds these to the common header)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .report import _pyplot, _s, _save, table


def _gib(n: Any) -> str:
    return f"{int(n) / 2**30:g} GiB"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def matrix_table(result: Mapping[str, Any], cells: Sequence[Mapping[str, Any]]) -> str:
    """One (profile, regime, workload): a row per load; fcfs in absolute values, every
    other policy as ratios to fcfs (mean / P99 JCT, throughput) and absolute attainment and
    recomputed tokens."""
    policies = result["policies"]
    headers = ["load", "req/s"]
    for p in policies:
        if p == "fcfs":
            headers += ["fcfs mean JCT s", "fcfs P99 JCT s", "fcfs tok/s", "fcfs SLO",
                        "fcfs recomp. tok"]
        else:
            headers += [f"{p} mean JCT", f"{p} P99 JCT", f"{p} tok/s", f"{p} SLO",
                        f"{p} recomp. tok"]
    headers.append("sim s")
    rows = []
    for c in sorted(cells, key=lambda c: c["load"]):
        row = [f"{c['load']:g}", f"{c['rate_rps']:.3g}"]
        for p in policies:
            run = c["runs"][p]
            if "error" in run:
                row += ["failed"] * 5
                continue
            m, r = run["metrics"], run["ratios"]
            if p == "fcfs":
                row += [_s(m["mean_jct_s"]), _s(m["p99_jct_s"]), _s(m["output_tokens_per_s"], 1, 0)]
            else:
                row += [_ratio(r["mean_jct_s"]), _ratio(r["p99_jct_s"]),
                        _ratio(r["output_tokens_per_s"])]
            row += [_s(m["attainment"], 100, 1) + "%", str(m["num_recomputed_tokens"])]
        row.append(f"{c['sim_wall_s']:.1f}")
        rows.append(row)
    return table(headers, rows)


def matrix_markdown(result: Mapping[str, Any]) -> str:
    parts = ["## Capacity (fcfs, every request arriving at 0)", ""]
    parts.append(table(
        ["profile", "regime", "workload", "req/s", "output tok/s", "recomp. tok", "sim s"],
        [[c["profile"], c["regime"], c["workload"], f"{c['capacity_rps']:.3g}",
          _s(c["output_tokens_per_s"], 1, 0), str(c["num_recomputed_tokens"]),
          f"{c['sim_wall_s']:.1f}"] for c in result["capacity"]]))
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for c in result["cells"]:
        groups.setdefault((c["profile"], c["regime"], c["workload"]), []).append(c)
    for (profile, regime, workload), cells in groups.items():
        w = result["workloads"][workload]
        memory = result["regimes"][profile][regime]
        d = w["description"]
        parts += [
            "", f"## {profile} / {regime} / {workload}", "",
            f"{w['preset']} lengths (input mean {d['input_tokens']['mean']:.0f} / median "
            f"{d['input_tokens']['median']:.0f}, output mean {d['output_tokens']['mean']:.0f} / "
            f"median {d['output_tokens']['median']:.0f} after clipping), Gamma arrivals CV "
            f"{w['cv']:g}; "
            + ", ".join(f"{k}={v}" for k, v in w["engine"].items())
            + f"; KV {_gib(memory.get('kv_cache_bytes', 0))} device, "
            f"{_gib(memory.get('kv_cache_host_memory_bytes', 0))} host; load 1 = "
            f"{cells[0]['capacity_rps']:.3g} req/s. Ratios are to fcfs in the same row; "
            "SLO is attainment, recomp. tok the tokens computed again.",
            "", matrix_table(result, cells),
        ]
    if result.get("mlfq_speedup"):
        parts += ["", "## skip_join_mlfq: fcfs mean JCT / its mean JCT", "", table(
            ["profile", "regime", "workload", "load", "heavy-tailed", "speedup"],
            [[x["profile"], x["regime"], x["workload"], f"{x['load']:g}",
              "yes" if x["heavy_tailed"] else "no", _s(x["speedup"], 1, 2)]
             for x in result["mlfq_speedup"]])]
    targets = result.get("targets", [])
    evaluated = [t for t in targets if t["met"] is not None]
    misses = result.get("misses", [])
    parts += ["", f"## Target misses: {len(misses)} of {len(evaluated)} evaluated", ""]
    parts += [f"- {t['target']}: {t['detail']}" for t in misses] or ["none"]
    if result.get("errors"):
        parts += ["", "## Failed simulations", ""]
        parts += [f"- {e['profile']}/{e['regime']}/{e['workload']} @ "
                  + ("capacity" if e["load"] is None else f"{e['load']:g}x")
                  + f" {e['policy']}: {e['error']}" for e in result["errors"]]
    timing = result.get("timing") or {}
    if timing:
        slowest = sorted(
            ((run["sim_wall_s"], c, p) for c in result["cells"]
             for p, run in c["runs"].items() if run.get("sim_wall_s") is not None),
            key=lambda x: -x[0])[:5]
        parts += ["", f"Wall time {timing['wall_s']:.0f} s (capacity runs "
                  f"{timing['capacity_wall_s']:.0f} s; simulations "
                  f"{timing['sim_wall_s_total']:.0f} s in all). Slowest simulations: "
                  + "; ".join(f"{c['profile']}/{c['regime']}/{c['workload']} @ "
                              f"{c['load']:g}x {p} {t:.1f} s" for t, c, p in slowest)]
    return "\n".join(parts)


def plot_matrix(result: Mapping[str, Any], path: str | Path) -> Path:
    """Mean-JCT ratio to fcfs against load, one line per policy; a panel per workload
    (columns) and profile x regime (rows)."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda y, _: f"{y:g}")
    colors = {p: f"C{i}" for i, p in enumerate(result["policies"])}
    rows = list(dict.fromkeys((c["profile"], c["regime"]) for c in result["cells"]))
    cols = list(dict.fromkeys(c["workload"] for c in result["cells"]))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.2 * len(cols), 2.8 * len(rows)),
                             squeeze=False)
    for i, (profile, regime) in enumerate(rows):
        for j, workload in enumerate(cols):
            ax = axes[i][j]
            cells = sorted((c for c in result["cells"] if (c["profile"], c["regime"],
                            c["workload"]) == (profile, regime, workload)),
                           key=lambda c: c["load"])
            ax.axhline(1.0, color=colors.get("fcfs", "grey"), linewidth=1, label="fcfs")
            for policy in result["policies"]:
                points = [(c["load"], c["runs"][policy].get("ratios", {}).get("mean_jct_s"))
                          for c in cells]
                points = [(x, y) for x, y in points if y]
                if points and policy != "fcfs":
                    ax.plot(*zip(*points, strict=True), marker="o", label=policy,
                            color=colors[policy])
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_title(f"{workload} / {regime}" + (f" ({profile})" if len(
                {p for p, _ in rows}) > 1 else ""), fontsize=9)
            ax.grid(True, alpha=0.3)
            if i == len(rows) - 1:
                ax.set_xlabel("load (x fcfs capacity)")
            if j == 0:
                ax.set_ylabel("mean JCT / fcfs")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)
