#!/usr/bin/env python3
"""Job completion time under ``fcfs`` and ``skip_join_mlfq``: one workload, several loads.

The workload (fixed seed, identical for both policies and every load):

* ``--num-requests`` requests; prompts of exactly the drawn number of tokens (lognormal
  lengths, ``--prompt-median`` / ``--prompt-mean`` tokens, at most ``--prompt-max``):
  windows of the shipped corpus encoded with the default model's tokenizer, BOS first,
  kept only when the decoded text re-encodes to the same ids (so the server sees exactly
  that many prompt tokens);
* heavy-tailed output lengths: a fraction ``--long-fraction`` of the requests is long
  (log-uniform in ``--long-tokens``), the rest short (log-uniform in ``--short-tokens``);
  ``max_tokens = min_length`` forces each length; greedy decoding;
* Poisson arrivals: one draw of unit-rate exponential gaps, scaled to each rate, so the
  loads differ only in time scale.

Loads are fractions (``--loads``) of the server's capacity, measured first on the first
policy's server (``fcfs``): closed loops keep each of ``--capacity-concurrency``
requests of the same mix in flight for ``--capacity-seconds``; capacity (requests/s) =
the best generated tokens/s after ``--capacity-warmup-seconds`` / the workload's mean
output length. ``--capacity`` skips the measurement.

For each policy the script copies ``model_repository/`` to a temporary directory, sets
``scheduler_policy`` and the KV budget (``--kv-cache-mib`` on the device,
``--host-kv-mib`` in host memory: small, so that memory runs out and preemption
happens; ``--param KEY=VALUE`` sets any other parameter, for both policies alike),
starts ``tritonserver`` on it (with ``--server-threads`` torch threads, default 1: on a
2-core machine shared with the client, two OpenMP threads stall whenever one of them is
descheduled), runs every load open loop and stops the server. Requests
leave at their scheduled times whatever the responses do: a sender thread issues each
request on one gRPC stream at its time (a non-blocking enqueue); a callback stamps every
response. Per request: send time, every token's arrival time, first token and finish.

Metrics per policy and load: mean and P99 job completion time (JCT = final response -
send), mean and P99 time to first token (TTFT), mean per-token latency (JCT / output
tokens), mean JCT of the short and of the long requests, and the change of the server's
``preemptserve_*`` counters over the load (preemptions, recomputations, swaps).

Output: tables on stdout, JSON with every request's timings in
``benchmarks/results/scheduling-<date>.json``, and ``docs/scheduling.png`` (mean and P99
JCT against load for both policies).

Usage::

    .venv/bin/python benchmarks/bench_scheduling.py [--num-requests 120] [--format markdown]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import queue
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import machine_info, print_table, process_tree_cpu_s

from preemptserve.triton_server import DEFAULT_MODEL_REPOSITORY, TritonServer

logger = logging.getLogger("bench_scheduling")

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_PLOT = REPO_ROOT / "docs" / "scheduling.png"
MODEL_NAME = "llm"
POLICIES = ("fcfs", "skip_join_mlfq")
MIB = 2**20


# -- workload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    index: int
    prompt_ids: tuple[int, ...]
    prompt_text: str
    output_tokens: int
    is_long: bool

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class Workload:
    jobs: tuple[Job, ...]
    unit_gaps: tuple[float, ...]  # exponential inter-arrival gaps at rate 1/s

    def arrivals_s(self, rate: float) -> list[float]:
        """Arrival offsets (s from the start) at ``rate`` requests/s."""
        return [float(t) for t in np.cumsum(self.unit_gaps) / rate]

    @property
    def mean_output_tokens(self) -> float:
        return statistics.fmean(j.output_tokens for j in self.jobs)


def load_tokenizer() -> Any:
    from tokenizers import Tokenizer

    from preemptserve.model.default_model import ensure_default_model

    return Tokenizer.from_file(str(ensure_default_model() / "tokenizer.json"))


def build_workload(args: argparse.Namespace) -> Workload:
    """Draw lengths and arrivals from ``args.seed``; prompts are corpus windows."""
    rng = np.random.default_rng(args.seed)
    n = args.num_requests

    # Prompt lengths: lognormal with the given median and mean (sigma from their ratio).
    sigma = math.sqrt(2 * math.log(args.prompt_mean / args.prompt_median))
    prompt_lens = np.clip(np.rint(rng.lognormal(math.log(args.prompt_median), sigma, n)),
                          2, args.prompt_max).astype(int)

    # Output lengths: exactly round(fraction * n) long requests at random positions.
    num_long = round(args.long_fraction * n)
    is_long = np.zeros(n, dtype=bool)
    is_long[rng.permutation(n)[:num_long]] = True

    def log_uniform(lo: int, hi: int, size: int) -> np.ndarray:
        return np.rint(np.exp(rng.uniform(math.log(lo), math.log(hi), size))).astype(int)

    (long_lo, long_hi), (short_lo, short_hi) = args.long_tokens, args.short_tokens
    output_lens = np.where(is_long, log_uniform(long_lo, long_hi, n),
                           log_uniform(short_lo, short_hi, n))
    unit_gaps = rng.exponential(1.0, n)
    unit_gaps[0] = 0.0  # the first request leaves at once

    tokenizer = load_tokenizer()
    corpus = resources.files("preemptserve").joinpath("assets", "corpus.txt")
    corpus_ids = tokenizer.encode(corpus.read_text(encoding="utf-8")).ids
    bos, body = corpus_ids[0], corpus_ids[1:]
    jobs = []
    for i in range(n):
        length = int(prompt_lens[i])
        offset = int(rng.integers(0, len(body) - 4 * args.prompt_max))
        while True:  # the first window from ``offset`` that round-trips through text
            candidate = [bos, *body[offset : offset + length - 1]]
            text = tokenizer.decode(candidate, skip_special_tokens=True)
            if tokenizer.encode(text).ids == candidate:
                break
            offset += 1
        if len(tokenizer.encode(text).ids) != length:  # the check the server's count relies on
            raise RuntimeError(f"prompt {i} re-encodes to a different length")
        jobs.append(Job(i, tuple(candidate), text, int(output_lens[i]), bool(is_long[i])))
    return Workload(tuple(jobs), tuple(float(g) for g in unit_gaps))


def describe_workload(w: Workload) -> dict[str, Any]:
    def stats(values: list[int]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "median": statistics.median(values),
                "p99": float(np.percentile(values, 99)), "min": min(values), "max": max(values)}

    return {
        "num_requests": len(w.jobs),
        "num_long": sum(j.is_long for j in w.jobs),
        "prompt_tokens": stats([j.prompt_tokens for j in w.jobs]),
        "output_tokens": stats([j.output_tokens for j in w.jobs]),
        "share_of_output_tokens_in_long_requests":
            sum(j.output_tokens for j in w.jobs if j.is_long)
            / sum(j.output_tokens for j in w.jobs),
    }


# -- model repository -------------------------------------------------------------------


def write_repository(root: Path, source: Path, parameters: dict[str, str]) -> Path:
    """A copy of ``source`` with ``config.pbtxt`` parameters set (replaced or appended)."""
    repo = root / "model_repository"
    shutil.copytree(source, repo, ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / MODEL_NAME / "config.pbtxt"
    text = config.read_text()
    for key, value in parameters.items():
        pattern = (rf'(parameters\s*\{{\s*key:\s*"{re.escape(key)}"'
                   r'\s*value:\s*\{\s*string_value:\s*)"[^"]*"')
        replacement = value.replace("\\", r"\\")
        text, count = re.subn(pattern, rf'\g<1>"{replacement}"', text)
        if count == 0:
            text += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
        elif count > 1:
            raise RuntimeError(f"parameter {key} appears {count} times in {config}")
    config.write_text(text)
    return repo


def served_parameters(config_text: str) -> dict[str, str]:
    pattern = re.compile(
        r'parameters\s*\{\s*key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"')
    text = "\n".join(line.split("#", 1)[0] for line in config_text.splitlines())
    return dict(pattern.findall(text))


# -- server-side measurements -----------------------------------------------------------


def scrape_metrics(metrics_url: str) -> dict[str, float]:
    """Every ``preemptserve_*`` sample on the metrics page: ``name{labels}`` -> value."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("preemptserve_"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def metric_total(samples: dict[str, float], name: str, **labels: str) -> float | None:
    """Sum of metric ``name`` over the samples carrying ``labels``; None when absent."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    values = [v for k, v in samples.items()
              if k.split("{", 1)[0] == name and all(w in k for w in wanted)]
    return sum(values) if values else None


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()
            if k.split("{", 1)[0].endswith("_total")}


def wait_idle(metrics_url: str, timeout_s: float) -> bool:
    """Until the model reports no waiting, running or preempted request."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not metric_total(scrape_metrics(metrics_url), "preemptserve_requests"):
            return True
    return False


# -- client -----------------------------------------------------------------------------


def make_inputs(job: Job) -> list[Any]:
    import tritonclient.grpc as grpcclient

    def tensor(name: str, datatype: str, value: Any, dtype: Any) -> Any:
        t = grpcclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=dtype))
        return t

    return [
        tensor("text_input", "BYTES", job.prompt_text.encode("utf-8"), np.object_),
        tensor("max_tokens", "INT32", job.output_tokens, np.int32),
        tensor("min_length", "INT32", job.output_tokens, np.int32),
        tensor("stream", "BOOL", True, np.bool_),
        tensor("exclude_input_in_output", "BOOL", True, np.bool_),
    ]


@dataclass
class Timing:
    scheduled_s: float
    send_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    finish_s: float | None = None


class StreamClient:
    """One gRPC stream; requests are tagged ``<tag>-<index>``; every response is stamped."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.timings: dict[str, Timing] = {}
        self.errors: list[str] = []
        self.finished: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self.client.start_stream(callback=self._on_response)

    def _on_response(self, result: Any, error: Any) -> None:
        now = time.perf_counter()
        if error is not None:
            with self._lock:
                self.errors.append(str(error))
            self.finished.put("")  # wake the waiter
            return
        response = result.get_response()
        timing = self.timings[response.id]
        if response.outputs:  # one response per token; the last one carries FINAL too
            timing.token_times_s.append(now)
        final = response.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            timing.finish_s = now
            self.finished.put(response.id)

    def send(self, request_id: str, inputs: list[Any], scheduled_s: float) -> None:
        timing = self.timings.setdefault(request_id, Timing(scheduled_s))
        timing.send_s = time.perf_counter()
        self.client.async_stream_infer(
            model_name=MODEL_NAME, inputs=inputs, request_id=request_id,
            outputs=[self._grpc.InferRequestedOutput("text_output")],
            enable_empty_final_response=True)

    def close(self, cancel: bool) -> None:
        try:
            self.client.stop_stream(cancel_requests=cancel)
        finally:
            self.client.close()


class BenchmarkFailure(RuntimeError):
    pass


def run_open_loop(url: str, workload: Workload, rate: float, tag: str,
                  timeout_s: float) -> tuple[float, dict[str, Timing]]:
    """Send every job at its Poisson arrival time; wait for every final response.

    Returns the start time (perf_counter) and the timings by request id.
    """
    arrivals = workload.arrivals_s(rate)
    inputs = [make_inputs(job) for job in workload.jobs]  # built before the clock starts
    client = StreamClient(url)
    ids = [f"{tag}-{job.index}" for job in workload.jobs]
    done = False
    try:
        start = time.perf_counter() + 0.2
        for request_id, at in zip(ids, arrivals, strict=True):
            client.timings[request_id] = Timing(at)

        def sender() -> None:
            for request_id, at, request_inputs in zip(ids, arrivals, inputs, strict=True):
                delay = start + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                client.send(request_id, request_inputs, at)

        thread = threading.Thread(target=sender, name="open-loop-sender", daemon=True)
        thread.start()
        deadline = time.monotonic() + arrivals[-1] + timeout_s
        remaining = set(ids)
        while remaining:
            try:
                finished_id = client.finished.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchmarkFailure(
                    f"{len(remaining)} of {len(ids)} requests unfinished {timeout_s:.0f} s after "
                    f"the last arrival (e.g. {sorted(remaining)[:5]})") from None
            if client.errors:
                raise BenchmarkFailure(f"the server answered with an error: {client.errors[0]}")
            remaining.discard(finished_id)
        thread.join()
        done = True
    finally:
        client.close(cancel=not done)
    return start, client.timings


def run_closed_loop(url: str, workload: Workload, concurrency: int, duration_s: float,
                    warmup_s: float) -> dict[str, Any]:
    """Keep ``concurrency`` jobs of the mix in flight; tokens/s after ``warmup_s``.

    Requests go out in the workload's order, cycling; at the end the ones still in
    flight are cancelled.
    """
    client = StreamClient(url)
    jobs = workload.jobs
    inputs = [make_inputs(job) for job in jobs]
    sent = 0

    def send_next() -> None:
        nonlocal sent
        client.send(f"cap{concurrency}-{sent}", inputs[sent % len(jobs)], 0.0)
        sent += 1

    start = time.perf_counter()
    end = start + duration_s
    completed = 0
    try:
        for _ in range(concurrency):
            send_next()
        while time.perf_counter() < end:
            try:
                finished_id = client.finished.get(timeout=max(0.01, end - time.perf_counter()))
            except queue.Empty:
                break
            if client.errors:
                raise BenchmarkFailure(f"the server answered with an error: {client.errors[0]}")
            completed += 1
            if time.perf_counter() < end and finished_id:
                send_next()
    finally:
        client.close(cancel=True)
    window = (start + warmup_s, end)
    tokens = sum(1 for t in client.timings.values() for s in t.token_times_s
                 if window[0] <= s < window[1])
    tokens_per_s = tokens / (window[1] - window[0])
    return {
        "concurrency": concurrency,
        "num_sent": sent,
        "num_completed": completed,
        "tokens_in_window": tokens,
        "tokens_per_s": tokens_per_s,
        "capacity_rps": tokens_per_s / workload.mean_output_tokens,
    }


def measure_capacity(server: TritonServer, workload: Workload,
                     args: argparse.Namespace) -> dict[str, Any]:
    """Closed loops at each ``--capacity-concurrency``; capacity = the best of them."""
    points = []
    for concurrency in args.capacity_concurrency:
        before = scrape_metrics(server.metrics_url)
        point = run_closed_loop(server.grpc_url, workload, concurrency,
                                args.capacity_seconds, args.capacity_warmup_seconds)
        if not wait_idle(server.metrics_url, args.timeout):
            raise BenchmarkFailure("requests still in flight after a capacity run")
        point["counters_delta"] = counter_deltas(before, scrape_metrics(server.metrics_url))
        logger.info("  %d in flight: %.0f tokens/s -> %.2f requests/s", concurrency,
                    point["tokens_per_s"], point["capacity_rps"])
        points.append(point)
    best = max(points, key=lambda p: p["tokens_per_s"])
    return {
        "method": "closed loops over the workload's requests (cycling), at several "
                  "concurrencies; capacity = the best tokens/s / mean output tokens",
        "duration_s": args.capacity_seconds,
        "warmup_s": args.capacity_warmup_seconds,
        "mean_output_tokens": workload.mean_output_tokens,
        "points": points,
        "concurrency": best["concurrency"],
        "tokens_per_s": best["tokens_per_s"],
        "capacity_rps": best["capacity_rps"],
    }


# -- per-load results -------------------------------------------------------------------


def summarize(workload: Workload, start: float, timings: dict[str, Timing],
              tag: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Summary metrics and per-request records (times in s from the load's start)."""
    records: list[dict[str, Any]] = []
    for job in workload.jobs:
        t = timings[f"{tag}-{job.index}"]
        assert t.send_s is not None and t.finish_s is not None
        if len(t.token_times_s) != job.output_tokens:
            raise BenchmarkFailure(f"request {job.index}: {len(t.token_times_s)} tokens streamed,"
                                   f" {job.output_tokens} expected")
        records.append({
            "index": job.index,
            "prompt_tokens": job.prompt_tokens,
            "output_tokens": job.output_tokens,
            "long": job.is_long,
            "scheduled_s": round(t.scheduled_s, 6),
            "send_s": round(t.send_s - start, 6),
            "first_token_s": round(t.token_times_s[0] - start, 6),
            "finish_s": round(t.finish_s - start, 6),
            "token_times_s": [round(s - start, 5) for s in t.token_times_s],
        })
    jct = [r["finish_s"] - r["send_s"] for r in records]
    ttft = [r["first_token_s"] - r["send_s"] for r in records]
    per_token = [j / r["output_tokens"] for j, r in zip(jct, records, strict=True)]
    short = [j for j, r in zip(jct, records, strict=True) if not r["long"]]
    long_ = [j for j, r in zip(jct, records, strict=True) if r["long"]]
    makespan = max(r["finish_s"] for r in records) - min(r["send_s"] for r in records)
    summary = {
        "mean_jct_s": statistics.fmean(jct),
        "p50_jct_s": float(np.percentile(jct, 50)),
        "p99_jct_s": float(np.percentile(jct, 99)),
        "mean_ttft_s": statistics.fmean(ttft),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
        "mean_per_token_latency_s": statistics.fmean(per_token),
        "p99_per_token_latency_s": float(np.percentile(per_token, 99)),
        "mean_jct_short_s": statistics.fmean(short) if short else float("nan"),
        "mean_jct_long_s": statistics.fmean(long_) if long_ else float("nan"),
        "makespan_s": makespan,
        "output_tokens_per_s": sum(r["output_tokens"] for r in records) / makespan,
        "max_send_lag_s": max(r["send_s"] - r["scheduled_s"] for r in records),
    }
    return summary, records


def run_policy(policy: str, args: argparse.Namespace, workload: Workload,
               parameters: dict[str, str], capacity_rps: float | None,
               workdir: Path) -> tuple[dict[str, Any], float]:
    root = workdir / policy
    root.mkdir()
    repo = write_repository(root, args.model_repository,
                            {**parameters, "scheduler_policy": policy})
    log_path = root / "tritonserver.log"
    result: dict[str, Any] = {
        "parameters": served_parameters((repo / MODEL_NAME / "config.pbtxt").read_text()),
        "loads": []}
    logger.info("%s: starting tritonserver (log %s)", policy, log_path)
    t_start = time.monotonic()
    with TritonServer(repo, log_file=log_path, ready_timeout_s=600) as server:
        try:
            result["server_start_s"] = time.monotonic() - t_start
            line = next((ln for ln in log_path.read_text(errors="replace").splitlines()
                         if "preemptserve: model" in ln), "")
            result["server_log_model_line"] = line.split("] ", 1)[-1]
            # Warm-up: a few requests of the mix, all at once.
            warm = Workload(workload.jobs[: args.warmup_requests],
                            (0.0,) * args.warmup_requests)
            run_open_loop(server.grpc_url, warm, 1.0, f"warmup-{policy}", args.timeout)
            if capacity_rps is None:
                logger.info("%s: measuring capacity (closed loops of %.0f s)", policy,
                            args.capacity_seconds)
                capacity = measure_capacity(server, workload, args)
                capacity["policy"] = policy
                capacity_rps = capacity["capacity_rps"]
                result["capacity"] = capacity
                logger.info("capacity: %.0f tokens/s -> %.2f requests/s",
                            capacity["tokens_per_s"], capacity_rps)
            for load in args.loads:
                rate = load * capacity_rps
                tag = f"{policy}-{load:g}"
                before = scrape_metrics(server.metrics_url)
                cpu_before = process_tree_cpu_s(server.pid or 0)
                load_before = os.getloadavg()[0]
                logger.info("%s: load %.2f x capacity = %.2f requests/s", policy, load, rate)
                start, timings = run_open_loop(server.grpc_url, workload, rate, tag,
                                               args.timeout)
                time.sleep(0.5)  # the engine loop publishes stats every 0.1 s
                after = scrape_metrics(server.metrics_url)
                summary, records = summarize(workload, start, timings, tag)
                deltas = counter_deltas(before, after)
                summary["preemptions"] = metric_total(deltas, "preemptserve_preemptions_total")
                summary["recomputations"] = metric_total(
                    deltas, "preemptserve_recomputations_total")
                summary["swaps_out"] = metric_total(
                    deltas, "preemptserve_swaps_total", direction="out")
                summary["swaps"] = metric_total(deltas, "preemptserve_swaps_total")
                summary["server_cpu_s"] = process_tree_cpu_s(server.pid or 0) - cpu_before
                logger.info("  mean JCT %.2f s, P99 JCT %.2f s, mean TTFT %.2f s, "
                            "preemptions %s, recomputations %s, swaps %s",
                            summary["mean_jct_s"], summary["p99_jct_s"],
                            summary["mean_ttft_s"], summary["preemptions"],
                            summary["recomputations"], summary["swaps"])
                result["loads"].append({
                    "load": load, "rate_rps": rate, "summary": summary,
                    "counters_delta": deltas, "metrics_after": after,
                    "load_average_1m": [load_before, os.getloadavg()[0]],
                    "requests": records,
                })
        except BaseException:
            logger.error("%s: benchmark failed; server log tail:\n%s", policy, server.log_tail())
            raise
    return result, capacity_rps


# -- report -----------------------------------------------------------------------------


def serving_machine_info() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return machine_info(torch=version("torch"), tritonclient=version("tritonclient"),
                        nvidia_pytriton=version("nvidia-pytriton"))


def sec(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


def count(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def report(result: dict[str, Any], fmt: str) -> None:
    m, w, p = result["machine"], result["workload"], result["parameters"]
    print(f"\n{result['date']}  {m['cpu_model']}, {m['num_cpus_usable']} CPUs usable, "
          f"torch {m['torch']}, {m['platform']}")
    print(f"command: {result['command']}")
    print(f"load average (1 min): {m['load_average_1m_at_start']:.2f} at start, "
          f"{m['load_average_1m_at_end']:.2f} at end")
    print(f"workload: {w['num_requests']} requests (seed {p['seed']}), Poisson arrivals; "
          f"prompt tokens mean {w['prompt_tokens']['mean']:.1f} / median "
          f"{w['prompt_tokens']['median']:.0f} / max {w['prompt_tokens']['max']}; output tokens "
          f"mean {w['output_tokens']['mean']:.1f} / median {w['output_tokens']['median']:.0f} / "
          f"max {w['output_tokens']['max']}, {w['num_long']} long requests "
          f"({100 * w['share_of_output_tokens_in_long_requests']:.0f}% of output tokens)")
    print(f"server: KV {p['kv_cache_mib']} MiB on the device + {p['host_kv_mib']} MiB host; "
          f"other parameters: {p['config_overrides'] or 'as in config.pbtxt'}")
    for policy, run in result["runs"].items():
        print(f"{policy} server: {run['server_log_model_line'].strip(chr(34))}")
    lag = max(e["summary"]["max_send_lag_s"] for run in result["runs"].values()
              for e in run["loads"])
    print(f"open loop: largest delay of a send behind its scheduled time {1000 * lag:.1f} ms")
    cap = result.get("capacity")
    if cap:
        points = ", ".join(f"{p['concurrency']} in flight {p['tokens_per_s']:.0f}"
                           for p in cap["points"])
        print(f"capacity ({cap['policy']}, closed loops, tokens/s: {points}): best "
              f"{cap['tokens_per_s']:.0f} tokens/s / {cap['mean_output_tokens']:.1f} tokens "
              f"= {cap['capacity_rps']:.2f} requests/s")
    else:
        print(f"capacity: {result['capacity_rps']:.2f} requests/s (given)")

    rows = []
    by_policy = {policy: run["loads"] for policy, run in result["runs"].items()}
    for policy, loads in by_policy.items():
        for entry in loads:
            s = entry["summary"]
            rows.append([policy, f"{entry['load']:.2f}", f"{entry['rate_rps']:.2f}",
                         sec(s["mean_jct_s"]), sec(s["p99_jct_s"]), sec(s["mean_ttft_s"]),
                         sec(s["p99_ttft_s"]), f"{1000 * s['mean_per_token_latency_s']:.0f}",
                         sec(s["mean_jct_short_s"]), sec(s["mean_jct_long_s"]),
                         count(s["preemptions"]), count(s["recomputations"]),
                         count(s["swaps_out"]),
                         f"{s['output_tokens_per_s']:.0f}"])
    print_table("JCT and TTFT by policy and load (seconds; per-token latency in ms)",
                ["policy", "load", "req/s", "mean JCT", "P99 JCT", "mean TTFT", "P99 TTFT",
                 "ms/token", "short mean JCT", "long mean JCT", "preemptions",
                 "recomputations", "swaps out",
                 "tokens/s"], rows, fmt)

    if set(POLICIES) <= set(by_policy):
        rows = []
        for f, q in zip(by_policy["fcfs"], by_policy["skip_join_mlfq"], strict=True):
            a, b = f["summary"], q["summary"]
            rows.append([f"{f['load']:.2f}", ratio(a["mean_jct_s"], b["mean_jct_s"]),
                         ratio(a["p99_jct_s"], b["p99_jct_s"]),
                         ratio(a["mean_ttft_s"], b["mean_ttft_s"]),
                         ratio(a["p99_ttft_s"], b["p99_ttft_s"]),
                         ratio(a["mean_jct_short_s"], b["mean_jct_short_s"]),
                         ratio(a["mean_jct_long_s"], b["mean_jct_long_s"])])
        print_table("fcfs / skip_join_mlfq (above 1: MLFQ is faster)",
                    ["load", "mean JCT", "P99 JCT", "mean TTFT", "P99 TTFT",
                     "short mean JCT", "long mean JCT"], rows, fmt)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"fcfs": ("tab:red", "o"), "skip_join_mlfq": ("tab:blue", "s")}
    for ax, key, title in ((axes[0], "mean_jct_s", "mean JCT"),
                           (axes[1], "p99_jct_s", "P99 JCT")):
        for policy, run in result["runs"].items():
            color, marker = styles.get(policy, ("gray", "x"))
            loads = [e["load"] for e in run["loads"]]
            ax.plot(loads, [e["summary"][key] for e in run["loads"]], marker=marker,
                    color=color, label=policy)
        ax.set_xlabel("load (x measured capacity)")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    cap = result["capacity_rps"]
    w = result["workload"]
    fig.suptitle(f"{w['num_requests']} requests, Poisson arrivals, capacity {cap:.2f} req/s; "
                 f"{result['date'][:10]}, {result['machine']['num_cpus_usable']} CPUs, no GPU",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 1.0, 1.2],
                        help="arrival rates as fractions of the measured capacity")
    parser.add_argument("--capacity", type=float, default=None,
                        help="capacity in requests/s (skips the measurement)")
    parser.add_argument("--capacity-concurrency", type=int, nargs="+", default=[8, 16, 32],
                        help="requests kept in flight by the capacity closed loops")
    parser.add_argument("--capacity-seconds", type=float, default=30.0)
    parser.add_argument("--capacity-warmup-seconds", type=float, default=10.0)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--prompt-median", type=float, default=24)
    parser.add_argument("--prompt-mean", type=float, default=32)
    parser.add_argument("--prompt-max", type=int, default=128)
    parser.add_argument("--short-tokens", type=int, nargs=2, default=[8, 32],
                        metavar=("MIN", "MAX"))
    parser.add_argument("--long-tokens", type=int, nargs=2, default=[200, 500],
                        metavar=("MIN", "MAX"))
    parser.add_argument("--long-fraction", type=float, default=0.1)
    parser.add_argument("--kv-cache-mib", type=float, default=32)
    parser.add_argument("--host-kv-mib", type=float, default=128)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="another config.pbtxt parameter, set for every policy")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads in the server (OMP_NUM_THREADS; 0: torch's "
                        "default). One leaves a core to the client on a 2-core machine")
    parser.add_argument("--warmup-requests", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds after the last arrival before a load counts as stuck")
    parser.add_argument("--format", choices=["plain", "markdown"], default="plain")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/scheduling-<date>.json)")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--model-repository", type=Path,
                        default=DEFAULT_MODEL_REPOSITORY)
    args = parser.parse_args(argv)
    if args.prompt_mean <= args.prompt_median or args.prompt_median < 2:
        parser.error("need --prompt-mean > --prompt-median >= 2")
    if not 0 <= args.long_fraction <= 1 or args.num_requests < 1:
        parser.error("need 0 <= --long-fraction <= 1 and --num-requests >= 1")
    if any(p not in POLICIES for p in args.policies):
        parser.error(f"policies: {', '.join(POLICIES)}")
    for item in args.param:
        if "=" not in item:
            parser.error(f"--param {item!r}: expected KEY=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the tritonserver context manager still stops it.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    if args.server_threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(args.server_threads)  # inherited by the server
    started = dt.datetime.now().astimezone()
    out_path = args.out or RESULTS_DIR / f"scheduling-{started:%Y-%m-%d}.json"
    overrides = dict(item.split("=", 1) for item in args.param)
    parameters = {
        **overrides,
        "kv_cache_bytes": str(int(args.kv_cache_mib * MIB)),
        "kv_cache_host_memory_bytes": str(int(args.host_kv_mib * MIB)),
    }
    workload = build_workload(args)
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": serving_machine_info(),
        "parameters": {
            "seed": args.seed, "num_requests": args.num_requests, "loads": args.loads,
            "prompt_median": args.prompt_median, "prompt_mean": args.prompt_mean,
            "prompt_max": args.prompt_max, "short_tokens": args.short_tokens,
            "long_tokens": args.long_tokens, "long_fraction": args.long_fraction,
            "kv_cache_mib": args.kv_cache_mib, "host_kv_mib": args.host_kv_mib,
            "config_overrides": overrides, "warmup_requests": args.warmup_requests,
            "server_threads": args.server_threads,
        },
        "workload": describe_workload(workload),
        "runs": {},
    }
    logger.info("workload: %s", json.dumps(result["workload"]))
    capacity_rps = args.capacity
    workdir = Path(tempfile.mkdtemp(prefix="bench-scheduling-"))
    try:
        for policy in args.policies:
            run, capacity_rps = run_policy(policy, args, workload, parameters, capacity_rps,
                                           workdir)
            if "capacity" in run:
                result["capacity"] = run.pop("capacity")
            result["runs"][policy] = run
    except BaseException:
        logger.error("server logs and repositories kept in %s", workdir)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    result["capacity_rps"] = capacity_rps
    result["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    result["elapsed_s"] = (dt.datetime.now().astimezone() - started).total_seconds()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result) + "\n")
    report(result, args.format)
    plot(result, args.plot)
    print(f"\nJSON written to {out_path}\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
