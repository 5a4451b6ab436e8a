"""Results as JSON, a Markdown report and PNG plots; the same for server runs and simulations.

A result is a plain dict::

    {"kind", "date", "command", "machine", "workload", "parameters", "slo",
     "runs": {label: {"policy", "backend": "server" | "sim" | "sim-cluster", "summary",
                      "counters", "cluster"}},      # "cluster": simulate-cluster's only
     "fidelity": [...], "sweep": [...]}      # the last two only for those commands

The ``matrix`` command's result has ``capacity``, ``cells``, ``targets`` and ``misses``
instead of ``runs`` (``bench/matrix.py``; its tables and plot: ``bench/matrix_report.py``).

``summary`` is ``metrics.summarize``'s output.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import RequestTimeline


def machine_info(**extra: Any) -> dict[str, Any]:
    """The machine a result was measured on; ``extra`` adds fields."""
    cpu_model, flags = "unknown", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model == "unknown":
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_simd": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}),
        "num_cpus": os.cpu_count(),
        "num_cpus_usable": len(os.sched_getaffinity(0)),
        "env": {
            k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
        },
        "load_average_1m_at_start": os.getloadavg()[0],
        **extra,
    }


def new_result(kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        **fields,
    }


def finish_result(result: dict[str, Any]) -> None:
    result["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]


def save_json(result: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return path


# -- Markdown --------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _s(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and np.isnan(value))
        else f"{value * scale:.{digits}f}"
    )


def runs_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    headers = [
        "run",
        "backend",
        "requests",
        "mean JCT s",
        "P50 JCT s",
        "P99 JCT s",
        "mean TTFT s",
        "P99 TTFT s",
        "mean TBT ms",
        "P99 TBT ms",
        "mean TPOT ms",
        "mean ms/token",
        "SLO attainment",
        "goodput req/s",
        "tokens/s",
    ]
    rows = []
    for label, run in runs.items():
        s = run["summary"]
        slo = s.get("slo") or {}
        rows.append(
            [
                label,
                run.get("backend", ""),
                str(s["num_requests"]),
                _s(s["jct_s"]["mean"]),
                _s(s["jct_s"]["p50"]),
                _s(s["jct_s"]["p99"]),
                _s(s["ttft_s"]["mean"]),
                _s(s["ttft_s"]["p99"]),
                _s(s["tbt_s"]["mean"], 1e3, 1),
                _s(s["tbt_s"]["p99"], 1e3, 1),
                _s(s["tpot_s"]["mean"], 1e3, 1),
                _s(s["per_token_latency_s"]["mean"], 1e3, 1),
                _s(slo.get("attainment"), 100, 1) + ("%" if slo else ""),
                _s(slo.get("goodput_rps"), 1, 2),
                _s(s["output_tokens_per_s"], 1, 0),
            ]
        )
    return table(headers, rows)


def cluster_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The cluster simulator's own metrics (``sim/cluster.py`` defines each)."""
    headers = [
        "run",
        "instances",
        "dispatch",
        "migrations started",
        "committed",
        "aborted src / dst",
        "mean downtime ms",
        "P99 downtime ms",
        "preempted s / request",
        "recomputed tokens",
        "fragmented ticks",
        "fragmented free blocks",
        "instance-seconds",
    ]
    rows = []
    for label, run in runs.items():
        c = run.get("cluster")
        if not c:
            continue
        m, d, f = c["migrations"], c["downtime_s"], c["fragmentation"]
        loss = c["preemption_loss"]
        rows.append([
            label,
            str(c["num_instances"]),
            c["dispatch_policy"] + ("" if c["enable_migration"] else ", no migration"),
            str(m["started"]),
            str(m["committed"]),
            f"{m['aborted_src']} / {m['aborted_dst']}",
            _s(d["mean"], 1e3, 1),
            _s(d["p99"], 1e3, 1),
            _s(loss["preempted_s_per_request"]),
            str(loss["recomputed_tokens"]),
            _s(f["fragmented_tick_share"], 100, 1) + "%",
            _s(f["fragmented_free_block_share"], 100, 2) + "%",
            _s(c["instance_seconds"], 1, 1),
        ])
    return table(headers, rows)


def speed_table(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = ["policy", "speed factor", "sim mean JCT s", "error", "sim P99 JCT s", "error"]
    body = []
    for r in rows:
        d = r["at_served_speed"]
        body.append([r["policy"], f"{d['speed_factor']:.3f}", _s(d["sim_mean_jct_s"]),
                     f"{100 * d['mean_jct_error']:+.1f}%", _s(d["sim_p99_jct_s"]),
                     f"{100 * d['p99_jct_error']:+.1f}%"])
    return table(headers, body)


def fidelity_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Means over the server's repeats and the simulator's seeds (ranges when several)."""

    def cell(row: Mapping[str, Any], side: str, key: str) -> str:
        text = _s(row[f"{side}_{key}_s"])
        low_high = row.get(f"{side}_{key}_range_s")
        if low_high and row.get(f"{side}_runs", 1) > 1:
            text += f" ({_s(low_high[0])}-{_s(low_high[1])})"
        return text

    def served_over_modelled(row: Mapping[str, Any]) -> str:
        ratio = (row.get("served_over_modelled_iterations") or {}).get("total")
        return "" if ratio is None else f"{ratio:.3f}"

    headers = ["policy"]
    for name in ("mean JCT s", "P99 JCT s", "mean TTFT s"):
        headers += [f"server {name}", f"sim {name}", "error"]
    headers.append("server iteration time / model")
    body = [
        [r["policy"]]
        + [
            x
            for key in ("mean_jct", "p99_jct", "mean_ttft")
            for x in (
                cell(r, "server", key), cell(r, "sim", key), f"{100 * r[f'{key}_error']:+.1f}%"
            )
        ]
        + [served_over_modelled(r)]
        for r in rows
    ]
    return table(headers, body)


def sweep_table(points: Sequence[Mapping[str, Any]]) -> str:
    headers = [
        "policy",
        "rate req/s",
        "mean JCT s",
        "P99 JCT s",
        "mean TTFT s",
        "SLO attainment",
        "goodput req/s",
    ]
    body = [
        [
            p["policy"],
            f"{p['rate_rps']:.3g}",
            _s(p["mean_jct_s"]),
            _s(p["p99_jct_s"]),
            _s(p["mean_ttft_s"]),
            _s(p["attainment"], 100, 1) + "%",
            _s(p["goodput_rps"], 1, 2),
        ]
        for p in points
    ]
    return table(headers, body)


def markdown(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    parts = [
        f"# {result['kind']}: {result['date']}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {m['cpu_model']}, {m['num_cpus_usable']} CPUs usable, "
        f"{m['platform']}; load average (1 min) {m['load_average_1m_at_start']:.2f} at "
        f"start, {m.get('load_average_1m_at_end', float('nan')):.2f} at end",
    ]
    w = result.get("workload")
    if w:
        parts.append(
            f"- workload: {w['name']}, {w['num_requests']} requests; input tokens mean "
            f"{w['input_tokens']['mean']:.1f} / median {w['input_tokens']['median']:.0f} / "
            f"max {w['input_tokens']['max']:.0f}; output tokens mean "
            f"{w['output_tokens']['mean']:.1f} / median {w['output_tokens']['median']:.0f} / "
            f"max {w['output_tokens']['max']:.0f}; arrivals over {w['duration_s']:.1f} s"
        )
    if result.get("parameters"):
        parts.append(f"- parameters: `{json.dumps(result['parameters'])}`")
    if result.get("slo"):
        parts.append(
            f"- SLO: TTFT < {result['slo']['ttft_s']} s and per-request P99 TBT < "
            f"{result['slo']['tbt_s']} s"
        )
    if result.get("runs"):
        parts += ["", runs_table(result["runs"])]
        if any(run.get("cluster") for run in result["runs"].values()):
            parts += ["", "## Cluster", "", cluster_table(result["runs"])]
        counters = {k: v.get("counters") for k, v in result["runs"].items() if v.get("counters")}
        if counters:
            parts += [
                "",
                "Counters: "
                + "; ".join(
                    f"{k}: " + ", ".join(f"{n}={_fmt(x)}" for n, x in c.items())
                    for k, c in counters.items()
                ),
            ]
    for policy, error in (result.get("server_errors") or {}).items():
        parts.append(f"- {policy}: no server run: {error}")
    if result.get("fidelity"):
        parts += ["", "## Simulator against the server", "", fidelity_table(result["fidelity"])]
        diagnosis = [r for r in result["fidelity"] if r.get("at_served_speed")]
        if diagnosis:
            parts += ["", "Diagnosis only (not a prediction): the simulator rerun at the speed "
                      "the servers' iterations had in these runs", "",
                      speed_table(diagnosis)]
    if result.get("sweep"):
        parts += ["", "## Rate sweep", "", sweep_table(result["sweep"])]
        if result.get("effective_throughput"):
            parts += [
                "",
                "Effective throughput (highest rate keeping "
                f"{100 * result['attainment_target']:.0f}% attainment): "
                + ", ".join(
                    f"{k} {_s(v, 1, 3)} req/s" for k, v in result["effective_throughput"].items()
                ),
            ]
    if result.get("kind") == "matrix":
        from .matrix_report import matrix_markdown  # the matrix's own tables

        parts += ["", matrix_markdown(result)]
    return "\n".join(parts) + "\n"


def _fmt(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


# -- plots -----------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(
    runs: Mapping[str, Sequence[RequestTimeline]], path: str | Path, title: str = ""
) -> Path:
    """CDFs of JCT, TTFT and per-request P99 TBT, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (
        ("JCT (s)", lambda t: t.jct_s),
        ("TTFT (s)", lambda t: t.ttft_s),
        ("per-request P99 TBT (s)", lambda t: t.p99_tbt_s()),
    )
    for ax, (label, metric) in zip(axes, panels, strict=True):
        for name, timelines in runs.items():
            values = np.sort([v for t in timelines if (v := metric(t)) is not None])
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_sweep(points: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """SLO attainment and mean / P99 JCT against the arrival rate, per policy."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(p["policy"] for p in points):
        mine = sorted((p for p in points if p["policy"] == policy), key=lambda p: p["rate_rps"])
        rates = [p["rate_rps"] for p in mine]
        axes[0].plot(rates, [100 * p["attainment"] for p in mine], marker="o", label=policy)
        (line,) = axes[1].plot(
            rates, [p["mean_jct_s"] for p in mine], marker="o", label=f"{policy} mean"
        )
        axes[1].plot(
            rates,
            [p["p99_jct_s"] for p in mine],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{policy} P99",
        )
    axes[0].set_ylabel("SLO attainment (%)")
    axes[1].set_ylabel("JCT (s)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("arrival rate (requests/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
