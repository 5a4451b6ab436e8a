#!/usr/bin/env python3
"""Throughput of the preemptserve engine against transformers, the GEMM floor and Triton.

Every measurement runs the same workload on the embedded default model (fp32, CPU):
``B`` requests, each a prompt of exactly ``--prompt-tokens`` token ids (distinct windows
of the shipped corpus, BOS first), greedy, ``max_tokens = min_length = --output-tokens``
so every request produces exactly that many tokens.

1. **engine**: ``LLMEngine`` in this process; add ``B`` requests, step until done.
   tokens/s = generated tokens / wall time (prefill included). ``decode tokens/s`` counts
   only the steps that held no prefill work.
2. **transformers**: ``LlamaForCausalLM.generate`` on the same checkpoint and prompts.
3. **GEMM floor**: ``torch.mm(x, W.t())`` timed with the model's own weights ``W``
   (fused QKV, o_proj, fused gate_up, down of every layer, then lm_head), ``x`` of ``M``
   rows. The floor of a step is the time of that sequence of matmuls alone.
   * decode floor tokens/s = B / floor(M = B)
   * workload floor tokens/s = B*N / (floor(prefill: M = B*P; lm_head M = B)
     + (N - 1) * floor(M = B)) -- the same work as the engine's run, matmuls only
   * peak floor: the same FLOPs (``LlamaArgs.matmul_flops_per_token``) at the FLOP/s of a
     2048^3 ``torch.mm``.
4. **Triton**: ``--concurrency`` streaming gRPC requests in flight at once (one stream,
   one response per token) against a ``tritonserver`` started here, timed from the first
   send to the last final response; side by side with the in-process engine at
   ``B = --concurrency``, repeats interleaved. The same requests with ``stream=false``
   (one response per request) are timed too, to show what per-token responses cost.

``--profile-steps`` pure decode steps at the smallest and the largest batch are timed by
stage (scheduler, batch building, model forward, lm_head, sampling, post-processing),
then as many again under ``torch.profiler`` by aten op (matmuls, KV gather, attention,
other ops, and the time outside any op).

Timings on a shared machine are noisy: each figure is the median of ``--repeats`` runs
after a warm-up, and the engine, transformers and GEMM runs of one batch size alternate.

Usage::

    .venv/bin/python benchmarks/bench_throughput.py [--batch-sizes 1 8 32] [--markdown]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from bench_common import machine_info, print_table, process_tree_cpu_s

from preemptserve.config import EngineConfig, serving_config_from_parameters
from preemptserve.core.request import SamplingParams
from preemptserve.engine import model_runner
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.pbtxt import read_parameters
from preemptserve.triton_server import DEFAULT_MODEL_REPOSITORY, TritonServer

logger = logging.getLogger("bench_throughput")

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MODEL_NAME = "llm"
PEAK_GEMM_SIZE = 2048


# -- workload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    num_prompt_tokens: int
    num_output_tokens: int

    @property
    def sampling(self) -> SamplingParams:
        """Greedy; ``min_length == max_tokens`` forces exactly ``num_output_tokens``."""
        n = self.num_output_tokens
        return SamplingParams(max_tokens=n, min_length=n)


def build_prompts(engine: LLMEngine, num_prompts: int, num_tokens: int) -> list[list[int]]:
    """``num_prompts`` distinct prompts of exactly ``num_tokens`` ids, BOS included.

    Each is a window of the encoded corpus whose decoded text re-encodes to the same
    ids, so the text sent to Triton and the ids given to the engine are one prompt.
    """
    corpus = resources.files("preemptserve").joinpath("assets", "corpus.txt")
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(corpus.read_text(encoding="utf-8"))
    bos = ids[0]
    body = ids[1:]
    window = num_tokens - 1
    prompts: list[list[int]] = []
    offset = 0
    while len(prompts) < num_prompts:
        if offset + window > len(body):
            raise RuntimeError(f"corpus too short for {num_prompts} prompts of {num_tokens}")
        candidate = [bos, *body[offset : offset + window]]
        if tokenizer.encode(tokenizer.decode(candidate)) == candidate:
            prompts.append(candidate)
            offset += 4 * window  # keep prompts apart
        else:
            offset += 1
    return prompts


def serving_config_from_pbtxt(path: Path) -> EngineConfig:
    """The engine config the ``llm`` model is served with (its ``parameters`` blocks)."""
    return serving_config_from_parameters(read_parameters(path)).engine


# -- machine ----------------------------------------------------------------------------


def torch_machine_info() -> dict[str, Any]:
    parallel = [line.split(":", 1)[1].strip() for line in
                torch.__config__.parallel_info().splitlines() if "parallel backend" in line]
    return machine_info(
        torch=torch.__version__,
        torch_num_threads=torch.get_num_threads(),
        torch_parallel_backend=parallel[0] if parallel else "unknown",
    )


# -- engine -----------------------------------------------------------------------------


@dataclass
class EngineRun:
    wall_s: float
    num_tokens: int
    decode_s: float
    num_decode_tokens: int
    token_ids: list[list[int]]
    texts: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.wall_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.num_decode_tokens / self.decode_s if self.decode_s else float("nan")


class ScheduleRecorder:
    """Keeps the last ``SchedulerOutput`` so each step can be classified."""

    def __init__(self, engine: LLMEngine) -> None:
        self.last: Any = None
        schedule = engine.scheduler.schedule

        def recorded() -> Any:
            self.last = schedule()
            return self.last

        engine.scheduler.schedule = recorded  # type: ignore[method-assign]

    @property
    def last_was_decode_only(self) -> bool:
        return all(not item.is_prefill for item in self.last.scheduled)


_run_counter = iter(range(10**9))


def run_engine(
    engine: LLMEngine, recorder: ScheduleRecorder, prompts: list[list[int]], workload: Workload
) -> EngineRun:
    """Run ``prompts`` to completion; every request must produce exactly N tokens."""
    run_id = next(_run_counter)
    request_ids = [f"run{run_id}-{i}" for i in range(len(prompts))]
    token_ids: dict[str, list[int]] = {r: [] for r in request_ids}
    texts = dict.fromkeys(request_ids, "")
    num_tokens = num_decode_tokens = 0
    decode_s = 0.0
    start = time.perf_counter()
    for request_id, prompt in zip(request_ids, prompts, strict=True):
        engine.add_request(request_id, prompt, workload.sampling)
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = engine.step()
        step_s = time.perf_counter() - step_start
        for out in outputs:
            token_ids[out.request_id].extend(out.token_ids)
            texts[out.request_id] += out.text
        num_tokens += len(outputs)
        if recorder.last_was_decode_only:
            decode_s += step_s
            num_decode_tokens += len(outputs)
    wall_s = time.perf_counter() - start
    expected = len(prompts) * workload.num_output_tokens
    if num_tokens != expected or any(len(t) != workload.num_output_tokens
                                     for t in token_ids.values()):
        raise RuntimeError(f"engine produced {num_tokens} tokens, expected {expected}")
    return EngineRun(wall_s, num_tokens, decode_s, num_decode_tokens,
                     [token_ids[r] for r in request_ids], [texts[r] for r in request_ids])


# -- transformers -----------------------------------------------------------------------


@dataclass
class HFRun:
    wall_s: float
    num_tokens: int
    token_ids: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.wall_s


def load_hf_model(model_dir: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def run_hf(model: Any, prompts: list[list[int]], workload: Workload, eos_id: int) -> HFRun:
    n = workload.num_output_tokens
    start = time.perf_counter()
    input_ids = torch.tensor(prompts)  # [B, P]: equal lengths, no padding
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=eos_id,
        eos_token_id=eos_id,
    )
    wall_s = time.perf_counter() - start
    generated = out[:, input_ids.shape[1] :]
    if generated.shape != (len(prompts), n):
        raise RuntimeError(f"transformers generated {tuple(generated.shape)} tokens")
    return HFRun(wall_s, generated.numel(), generated.tolist())


# -- GEMM floor -------------------------------------------------------------------------


def model_gemm_weights(engine: LLMEngine) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
    """The model's linear weights in forward order ([out, in] each), and lm_head's."""
    layers: list[tuple[str, torch.Tensor]] = []
    for layer in engine.model.model.layers:
        layers += [
            ("qkv", layer.self_attn.qkv_proj.weight),
            ("o_proj", layer.self_attn.o_proj.weight),
            ("gate_up", layer.mlp.gate_up_proj.weight),
            ("down", layer.mlp.down_proj.weight),
        ]
    return layers, engine.model.lm_head.weight


@torch.inference_mode()
def time_gemm_pass(
    engine: LLMEngine, m_layers: int, m_head: int, min_time_s: float = 0.3, min_reps: int = 5
) -> dict[str, float]:
    """Median seconds of one pass of the model's matmuls: per kind and ``"total"``.

    One pass = ``torch.mm(x, W.t())`` for every layer weight with ``x: [m_layers, in]``,
    then lm_head with ``x: [m_head, d]``, as the model runs them (same weights, same
    order, so caches see the same traffic as in a real step).
    """
    layers, head = model_gemm_weights(engine)
    inputs: dict[tuple[int, int], torch.Tensor] = {}

    def x_for(m: int, w: torch.Tensor) -> torch.Tensor:
        key = (m, w.shape[1])
        if key not in inputs:
            inputs[key] = torch.randn(key)
        return inputs[key]

    plan = [(kind, x_for(m_layers, w), w) for kind, w in layers]
    plan.append(("lm_head", x_for(m_head, head), head))
    samples: dict[str, list[float]] = {}
    spent_s, reps = 0.0, 0
    while reps < min_reps + 1 or spent_s < min_time_s:
        per_kind: dict[str, float] = {}
        for kind, x, w in plan:
            t0 = time.perf_counter()
            torch.mm(x, w.t())
            per_kind[kind] = per_kind.get(kind, 0.0) + time.perf_counter() - t0
        per_kind["total"] = sum(per_kind.values())
        if reps > 0:  # the first pass warms up
            for kind, t in per_kind.items():
                samples.setdefault(kind, []).append(t)
            spent_s += per_kind["total"]
        reps += 1
    return {kind: statistics.median(ts) for kind, ts in samples.items()}


@torch.inference_mode()
def measure_peak_gemm_s(size: int = PEAK_GEMM_SIZE, reps: int = 2) -> list[float]:
    """Seconds of ``reps`` square ``torch.mm`` calls of ``size`` (after one warm-up)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return times


def workload_flops(engine: LLMEngine, batch_size: int, workload: Workload) -> float:
    """Matmul FLOPs of the workload: layers for prompt + fed-back tokens, lm_head per token."""
    args = engine.args
    head = 2 * args.vocab_size * args.hidden_size
    layer = args.matmul_flops_per_token() - head
    p, n = workload.num_prompt_tokens, workload.num_output_tokens
    return batch_size * ((p + n - 1) * layer + n * head)


# -- decode step breakdown --------------------------------------------------------------


@contextmanager
def timed_attr(obj: Any, name: str, totals: dict[str, float], key: str) -> Iterator[None]:
    """Temporarily wrap ``obj.name`` so its calls add their wall time to ``totals[key]``."""
    original = getattr(obj, name)
    own = name in vars(obj)  # a module global or an instance attribute set earlier

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)  # the class's method shows through again


_OP_CATEGORIES: list[tuple[str, Callable[[str], bool]]] = [
    ("matmul (aten::mm/addmm)", lambda op: op in ("aten::mm", "aten::addmm", "aten::matmul",
                                                  "aten::linear")),
    ("KV gather + write (aten::index, index_copy_)",
     lambda op: op in ("aten::index", "aten::index_copy_", "aten::index_select")),
    ("attention kernel (sdpa)", lambda op: "scaled_dot_product" in op or op in (
        "aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::softmax")),
]


def profile_decode_steps(
    engine: LLMEngine, recorder: ScheduleRecorder, prompts: list[list[int]],
    workload: Workload, num_steps: int,
) -> dict[str, Any]:
    """Time ``num_steps`` pure decode steps by stage, then profile as many by aten op."""
    from torch.profiler import ProfilerActivity, profile

    run_id = next(_run_counter)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"prof{run_id}-{i}", prompt, workload.sampling)
    while True:  # get past every prefill
        engine.step()
        if recorder.last_was_decode_only:
            break

    stages: dict[str, float] = {}
    steps_s: list[float] = []
    runner, model, scheduler = engine.runner, engine.model, engine.scheduler
    with (timed_attr(scheduler, "schedule", stages, "schedule"),
          timed_attr(scheduler, "update_from_output", stages, "update_from_output"),
          timed_attr(runner, "execute", stages, "execute"),
          timed_attr(model, "forward", stages, "forward"),
          timed_attr(model, "compute_logits", stages, "lm_head"),
          timed_attr(model_runner, "sample", stages, "sample")):
        for _ in range(num_steps):
            t0 = time.perf_counter()
            engine.step()
            steps_s.append(time.perf_counter() - t0)
            if not recorder.last_was_decode_only:
                raise RuntimeError("too few output tokens to profile decode steps")
    step_s = sum(steps_s) / num_steps
    per_step = {k: v / num_steps for k, v in stages.items()}
    timers = {
        "scheduler.schedule": per_step["schedule"],
        "runner: batch + metadata tensors": per_step["execute"] - per_step["forward"]
        - per_step["lm_head"] - per_step["sample"],
        "model forward (layers)": per_step["forward"],
        "lm_head": per_step["lm_head"],
        "sample (argmax)": per_step["sample"],
        "scheduler.update_from_output": per_step["update_from_output"],
        "engine post-processing (detokenize, outputs)": step_s - per_step["schedule"]
        - per_step["execute"] - per_step["update_from_output"],
    }

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        profiled_step_s = (time.perf_counter() - t0) / num_steps
    ops: dict[str, float] = {}
    for event in prof.key_averages():
        ops[event.key] = ops.get(event.key, 0.0) + event.self_cpu_time_total / 1e6 / num_steps
    categories = dict.fromkeys([name for name, _ in _OP_CATEGORIES], 0.0)
    other_ops = 0.0
    for op, seconds in ops.items():
        for name, match in _OP_CATEGORIES:
            if match(op):
                categories[name] += seconds
                break
        else:
            other_ops += seconds
    categories["other aten ops (norm, rope, silu, add, copies, ...)"] = other_ops
    categories["outside aten ops (Python, dispatch, profiler)"] = (
        profiled_step_s - sum(categories.values())
    )
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1])[:12]

    while engine.has_unfinished_requests():
        engine.step()
    return {
        "batch_size": len(prompts),
        "num_steps": num_steps,
        "step_s": step_s,
        "stages_s": timers,
        "profiled_step_s": profiled_step_s,
        "op_categories_s": categories,
        "top_ops_self_s": dict(top_ops),
    }


# -- Triton -----------------------------------------------------------------------------


@dataclass
class TritonRun:
    wall_s: float
    num_tokens: int
    texts: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.wall_s


def run_triton(
    url: str, prompts: list[str], workload: Workload, timeout_s: float, stream: bool = True
) -> TritonRun:
    """All prompts in flight at once on one gRPC stream.

    With ``stream`` the model sends one response per token (``num_tokens`` counts them);
    without, one response per request holding all its text (``num_tokens`` = N each).
    """
    import numpy as np
    import tritonclient.grpc as grpcclient

    n = workload.num_output_tokens
    num_responses = [0] * len(prompts)
    texts = [""] * len(prompts)
    errors: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    num_open = len(prompts)
    last_final_s = 0.0

    def callback(result: Any, error: Any) -> None:
        nonlocal num_open, last_final_s
        now = time.perf_counter()
        with lock:
            if error is not None:
                errors.append(str(error))
                done.set()
                return
            response = result.get_response()
            index = int(response.id)
            output = result.as_numpy("text_output")
            if output is not None:
                num_responses[index] += 1
                texts[index] += b"".join(output.reshape(-1)).decode("utf-8", "replace")
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                num_open -= 1
                last_final_s = now
                if num_open == 0:
                    done.set()

    dtypes = {"BYTES": np.object_, "INT32": np.int32, "BOOL": np.bool_}

    def tensor(name: str, datatype: str, value: Any) -> Any:
        t = grpcclient.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=dtypes[datatype]))
        return t

    client = grpcclient.InferenceServerClient(url=url)
    try:
        client.start_stream(callback=callback)
        start = time.perf_counter()
        for index, prompt in enumerate(prompts):
            client.async_stream_infer(
                model_name=MODEL_NAME,
                inputs=[
                    tensor("text_input", "BYTES", prompt.encode("utf-8")),
                    tensor("max_tokens", "INT32", n),
                    tensor("min_length", "INT32", n),
                    tensor("stream", "BOOL", stream),
                    tensor("exclude_input_in_output", "BOOL", True),
                ],
                outputs=[grpcclient.InferRequestedOutput("text_output")],
                request_id=str(index),
                enable_empty_final_response=True,
            )
        if not done.wait(timeout_s):
            raise RuntimeError(f"Triton run not finished after {timeout_s:.0f} s")
        if errors:
            raise RuntimeError(f"Triton returned an error: {errors[0]}")
        wall_s = last_final_s - start
    finally:
        client.stop_stream(cancel_requests=not done.is_set())
        client.close()
    expected = n if stream else 1
    if any(count != expected for count in num_responses):
        raise RuntimeError(f"expected {expected} responses per request, "
                           f"got {sorted(set(num_responses))}")
    return TritonRun(wall_s, n * len(prompts), texts)


def run_engine_closed_loop(
    engine: LLMEngine, prompts: list[list[int]], workload: Workload, num_requests: int
) -> float:
    """Keep ``len(prompts)`` requests in flight, refilling as each ends; tokens/s.

    The in-process counterpart of perf_analyzer's ``--concurrency-range C``.
    """
    run_id = next(_run_counter)
    num_started = num_tokens = 0

    def start_one() -> None:
        nonlocal num_started
        prompt = prompts[num_started % len(prompts)]
        engine.add_request(f"closed{run_id}-{num_started}", prompt, workload.sampling)
        num_started += 1

    start = time.perf_counter()
    for _ in range(min(len(prompts), num_requests)):
        start_one()
    while engine.has_unfinished_requests():
        for out in engine.step():
            num_tokens += 1
            if out.finished and num_started < num_requests:
                start_one()
    wall_s = time.perf_counter() - start
    if num_tokens != num_requests * workload.num_output_tokens:
        raise RuntimeError(f"closed loop produced {num_tokens} tokens")
    return num_tokens / wall_s


def run_perf_analyzer(
    grpc_url: str, prompts: list[str], workload: Workload, concurrency: int,
    measurement_ms: int, workdir: Path,
) -> dict[str, float]:
    """perf_analyzer --streaming at a fixed concurrency on the same prompts.

    One response per token, so its "Response Throughput" is generated tokens/s.
    """
    n = workload.num_output_tokens
    data = {"data": [{"text_input": [p], "max_tokens": [n], "min_length": [n],
                      "stream": [True], "exclude_input_in_output": [True]} for p in prompts]}
    inputs = workdir / "perf_inputs.json"
    inputs.write_text(json.dumps(data))
    report = workdir / "perf.csv"
    script = Path(__file__).resolve().parents[1] / "client" / "run_perf_analyzer.sh"
    env = {**os.environ, "PERF_URL": grpc_url, "PERF_INPUT_DATA": str(inputs),
           "PERF_MEASUREMENT_MS": str(measurement_ms)}
    proc = subprocess.run(
        [str(script), "--concurrency-range", str(concurrency), "-f", str(report),
         "--max-trials", "3", "--stability-percentage", "999"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    row = next(csv.DictReader(report.open()))
    return {"responses_per_s": float(row["Response Throughput"]),
            "requests_per_s": float(row["Inferences/Second"])}


# -- output -----------------------------------------------------------------------------


def f0(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.0f}"


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"


def ms(x: float) -> str:
    return f"{1000 * x:.2f}"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per measurement after one warm-up (median reported)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="streaming requests in flight for the Triton comparison")
    parser.add_argument("--profile-steps", type=int, default=16,
                        help="decode steps timed and profiled at the largest batch (0: skip)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads here and in the server (OMP_NUM_THREADS); "
                        "default: torch's default")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--perf-measurement-ms", type=int, default=8000,
                        help="perf_analyzer measurement window (ms)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--format", choices=["rich", "plain", "markdown"], default="rich",
                        help="table style (rich falls back to plain if not installed)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/throughput-<date>.json)")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    args = parser.parse_args(argv)
    if min(args.batch_sizes) <= 0 or args.prompt_tokens < 2 or args.output_tokens < 1:
        parser.error("batch sizes and --output-tokens must be positive, --prompt-tokens >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("preemptserve").setLevel(logging.WARNING)
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the tritonserver context manager still stops it.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server's stub
    started = dt.datetime.now().astimezone()
    workload = Workload(args.prompt_tokens, args.output_tokens)
    batch_sizes = sorted(set(args.batch_sizes))
    out_path = args.out or RESULTS_DIR / f"throughput-{started:%Y-%m-%d}.json"

    served = serving_config_from_pbtxt(args.model_repository / MODEL_NAME / "config.pbtxt")
    max_batch = max(batch_sizes + [args.concurrency])
    # Same settings as the served model, on CPU, with room for the largest batch.
    config = replace(served, device="cpu", scheduler=replace(
        served.scheduler, max_batch_size=max(served.scheduler.max_batch_size, max_batch)))
    engine = LLMEngine(config)
    recorder = ScheduleRecorder(engine)
    prompts = build_prompts(engine, max_batch, workload.num_prompt_tokens)
    eos_id = engine.eos_token_id if engine.eos_token_id is not None else 0
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": torch_machine_info(),
        "model": {"dir": str(engine.model_dir), "dtype": config.dtype, "device": "cpu",
                  "num_params": engine.args.num_params(),
                  "matmul_flops_per_token": engine.args.matmul_flops_per_token()},
        "engine_config": {"scheduler": {**vars(config.scheduler),
                                        "options": dict(config.scheduler.options)},
                          "cache": vars(config.cache)},
        "workload": {"num_prompt_tokens": workload.num_prompt_tokens,
                     "num_output_tokens": workload.num_output_tokens, "greedy": True,
                     "min_length": workload.num_output_tokens},
        "repeats": args.repeats,
    }
    logger.info("model %s, %d params, torch threads %d", engine.model_dir,
                engine.args.num_params(), torch.get_num_threads())

    # 1-3. engine, transformers and the GEMM floor, interleaved per repeat.
    hf_model = None if args.skip_transformers else load_hf_model(engine.model_dir)
    per_batch: dict[int, dict[str, Any]] = {}
    peak_samples_s: list[float] = []
    for b in batch_sizes:
        per_batch[b] = bench_batch(engine, recorder, hf_model, prompts[:b], workload,
                                   args.repeats, eos_id, peak_samples_s)
    del hf_model
    peak_s = median(peak_samples_s)
    peak = {"size": PEAK_GEMM_SIZE, "median_s": peak_s, "min_s": min(peak_samples_s),
            "num_samples": len(peak_samples_s), "flops_per_s": 2 * PEAK_GEMM_SIZE**3 / peak_s}
    result["peak_gemm"] = peak
    logger.info("peak GEMM %d^3: %.1f GFLOP/s", peak["size"], peak["flops_per_s"] / 1e9)
    flops_per_token = engine.args.matmul_flops_per_token()
    for b, entry in per_batch.items():
        entry["peak_floor_decode_tokens_per_s"] = peak["flops_per_s"] / flops_per_token
        entry["peak_floor_workload_tokens_per_s"] = (
            b * workload.num_output_tokens * peak["flops_per_s"]
            / workload_flops(engine, b, workload))

    # Decode step breakdown at the smallest and the largest batch.
    steps = min(args.profile_steps, (workload.num_output_tokens - 2) // 2)
    if steps > 0:
        result["decode_step_breakdown"] = {
            str(b): profile_decode_steps(engine, recorder, prompts[:b], workload, steps)
            for b in sorted({batch_sizes[0], batch_sizes[-1]})
        }

    # 4. Triton against the in-process engine, interleaved.
    if not args.skip_triton:
        result["triton"] = bench_triton(args, engine, recorder, prompts[: args.concurrency],
                                        workload, served.scheduler.max_batch_size)

    result["batch_sizes"] = {str(b): e for b, e in per_batch.items()}
    result["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    result["elapsed_s"] = (dt.datetime.now().astimezone() - started).total_seconds()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    report(result, per_batch, args, workload)
    print(f"\nJSON written to {out_path}")
    return 0


def bench_batch(
    engine: LLMEngine, recorder: ScheduleRecorder, hf_model: Any, prompts: list[list[int]],
    workload: Workload, repeats: int, eos_id: int, peak_samples_s: list[float],
) -> dict[str, Any]:
    """Engine, transformers and GEMM-floor samples at one batch size, interleaved.

    Each repeat runs the engine, then transformers, then the model's GEMMs at decode and
    prefill shapes and a peak GEMM, so that a burst of load on a shared machine hits all
    of them rather than one.
    """
    b, n = len(prompts), workload.num_output_tokens
    run_engine(engine, recorder, prompts, workload)  # warm-ups
    if hf_model is not None:
        run_hf(hf_model, prompts, workload, eos_id)
    engine_runs: list[EngineRun] = []
    hf_runs: list[HFRun] = []
    decode_passes: list[dict[str, float]] = []
    prefill_passes: list[dict[str, float]] = []
    for _ in range(repeats):
        engine_runs.append(run_engine(engine, recorder, prompts, workload))
        if hf_model is not None:
            hf_runs.append(run_hf(hf_model, prompts, workload, eos_id))
        decode_passes.append(time_gemm_pass(engine, b, b))
        prefill_passes.append(time_gemm_pass(engine, b * workload.num_prompt_tokens, b))
        peak_samples_s.extend(measure_peak_gemm_s(reps=2))

    def median_pass(passes: list[dict[str, float]]) -> dict[str, float]:
        return {kind: median([p[kind] for p in passes]) for kind in passes[0]}

    decode, prefill = median_pass(decode_passes), median_pass(prefill_passes)
    entry: dict[str, Any] = {
        "engine_tokens_per_s": [r.tokens_per_s for r in engine_runs],
        "engine_decode_tokens_per_s": [r.decode_tokens_per_s for r in engine_runs],
        "engine_wall_s": [r.wall_s for r in engine_runs],
        "gemm_decode_step_s": decode,
        "gemm_decode_step_total_s_samples": [p["total"] for p in decode_passes],
        "gemm_prefill_s": prefill,
        "floor_decode_tokens_per_s": b / decode["total"],
        "floor_workload_tokens_per_s": b * n / (prefill["total"] + (n - 1) * decode["total"]),
        "gemm_decode_flops_per_s": b * engine.args.matmul_flops_per_token() / decode["total"],
    }
    log = f"B={b}: engine {median(entry['engine_tokens_per_s']):.0f} tokens/s"
    if hf_runs:
        entry["hf_tokens_per_s"] = [r.tokens_per_s for r in hf_runs]
        entry["hf_same_tokens_as_engine"] = hf_runs[-1].token_ids == engine_runs[-1].token_ids
        log += f", transformers {median(entry['hf_tokens_per_s']):.0f} tokens/s"
    logger.info("%s, decode GEMM floor %.0f tokens/s", log, entry["floor_decode_tokens_per_s"])
    return entry


def bench_triton(
    args: argparse.Namespace, engine: LLMEngine, recorder: ScheduleRecorder,
    prompts: list[list[int]], workload: Workload, served_max_batch: int,
) -> dict[str, Any]:
    texts = [engine.tokenizer.decode(p) for p in prompts]
    timeout_s = 600.0
    if args.concurrency > served_max_batch:
        logger.warning("concurrency %d > the served max_batch_size %d: Triton queues the rest",
                       args.concurrency, served_max_batch)
    logger.info("starting tritonserver on %s", args.model_repository)
    with TritonServer(args.model_repository, ready_timeout_s=300) as server:
        try:
            run_triton(server.grpc_url, texts, workload, timeout_s)  # warm-up
            engine_runs, triton_runs, unstreamed_runs = [], [], []
            run_engine(engine, recorder, prompts, workload)  # warm-up
            engine_cpu_s = server_cpu_s = 0.0
            for _ in range(args.repeats):
                cpu_start = time.process_time()
                engine_runs.append(run_engine(engine, recorder, prompts, workload))
                engine_cpu_s += time.process_time() - cpu_start
                cpu_start = process_tree_cpu_s(server.pid or 0)
                triton_runs.append(run_triton(server.grpc_url, texts, workload, timeout_s))
                server_cpu_s += process_tree_cpu_s(server.pid or 0) - cpu_start
                # Diagnostic: the same requests with one response each instead of N.
                unstreamed_runs.append(
                    run_triton(server.grpc_url, texts, workload, timeout_s, stream=False))
            # Steady state with perf_analyzer's C++ client (far less client CPU on this
            # machine's 2 cores than Python's) against the same closed loop in process.
            closed_engine, closed_perf = [], []
            with tempfile.TemporaryDirectory() as workdir:
                for _ in range(args.repeats):
                    closed_engine.append(run_engine_closed_loop(
                        engine, prompts, workload, num_requests=4 * len(prompts)))
                    closed_perf.append(run_perf_analyzer(
                        server.grpc_url, texts, workload, args.concurrency,
                        args.perf_measurement_ms, Path(workdir))["responses_per_s"])
        except Exception:
            logger.error("Triton benchmark failed\n%s", server.log_tail())
            raise
    engine_tps = [r.tokens_per_s for r in engine_runs]
    triton_tps = [r.tokens_per_s for r in triton_runs]
    unstreamed_tps = [r.tokens_per_s for r in unstreamed_runs]
    return {
        "concurrency": args.concurrency,
        "engine_tokens_per_s": engine_tps,
        "triton_tokens_per_s": triton_tps,
        "triton_wall_s": [r.wall_s for r in triton_runs],
        "pair_ratios": [t / e for t, e in zip(triton_tps, engine_tps, strict=True)],
        "ratio_of_medians": median(triton_tps) / median(engine_tps),
        "same_text_as_engine": triton_runs[-1].texts == engine_runs[-1].texts,
        "unstreamed_tokens_per_s": unstreamed_tps,
        "unstreamed_ratio_of_medians": median(unstreamed_tps) / median(engine_tps),
        "unstreamed_same_text_as_engine": unstreamed_runs[-1].texts == engine_runs[-1].texts,
        # CPU seconds per generated token: the serving path's own cost, without the
        # client's, which shares this machine's cores during the wall-clock runs.
        "engine_cpu_s_per_token": engine_cpu_s / sum(r.num_tokens for r in engine_runs),
        "server_cpu_s_per_token": server_cpu_s / sum(r.num_tokens for r in triton_runs),
        "closed_loop_engine_tokens_per_s": closed_engine,
        "perf_analyzer_tokens_per_s": closed_perf,
        "perf_analyzer_pair_ratios": [t / e for t, e in zip(closed_perf, closed_engine,
                                                            strict=True)],
        "perf_analyzer_ratio_of_medians": median(closed_perf) / median(closed_engine),
    }


def print_breakdowns(breakdowns: dict[str, dict[str, Any]],
                     per_batch: dict[int, dict[str, Any]], fmt: str) -> None:
    """Two tables, one column pair (ms/step, share) per profiled batch size."""
    parts = list(breakdowns.values())
    headers = [h for part in parts for h in (f"B={part['batch_size']} ms/step", "share")]
    num_steps = parts[0]["num_steps"]

    def rows_of(key: str, total_key: str, total_name: str) -> list[list[str]]:
        rows = [[name] + [c for part in parts for c in
                          (ms(part[key][name]), pct(part[key][name] / part[total_key]))]
                for name in parts[0][key]]
        rows.append([total_name] + [c for part in parts for c in (ms(part[total_key]), "100%")])
        return rows

    print_table(f"Decode step by stage (mean of {num_steps} pure decode steps, wall time)",
                ["stage", *headers], rows_of("stages_s", "step_s", "step (wall)"), fmt)
    rows = rows_of("op_categories_s", "profiled_step_s", "step (wall, under the profiler)")
    floors = [per_batch[part["batch_size"]]["gemm_decode_step_s"]["total"] for part in parts]
    rows.append(["for reference: the same matmuls alone (GEMM floor)"] + [
        c for part, floor in zip(parts, floors, strict=True)
        for c in (ms(floor), pct(floor / part["profiled_step_s"]))])
    print_table(f"Decode step by aten op (torch.profiler self CPU time, {num_steps} more steps)",
                ["category", *headers], rows, fmt)


def report(result: dict[str, Any], per_batch: dict[int, dict[str, Any]],
           args: argparse.Namespace, workload: Workload) -> None:
    fmt = args.format
    m = result["machine"]
    print(f"\n{result['date']}  {m['cpu_model']}, {m['num_cpus_usable']} CPUs usable, "
          f"torch {m['torch']} ({m['torch_num_threads']} threads), {m['platform']}")
    print(f"command: {result['command']}")
    print(f"load average (1 min): {m['load_average_1m_at_start']:.2f} at start, "
          f"{m['load_average_1m_at_end']:.2f} at end")
    print(f"workload: B requests x {workload.num_prompt_tokens} prompt tokens -> exactly "
          f"{workload.num_output_tokens} generated tokens each, greedy, fp32, CPU; "
          f"median of {args.repeats} runs after a warm-up")

    rows = []
    for b, e in per_batch.items():
        hf = median(e.get("hf_tokens_per_s", []))
        eng = median(e["engine_tokens_per_s"])
        rows.append([str(b), f0(eng), f0(median(e["engine_decode_tokens_per_s"])), f0(hf),
                     f"{eng / hf:.2f}x" if not math.isnan(hf) else "n/a",
                     str(e.get("hf_same_tokens_as_engine", "n/a"))])
    print_table("Throughput (generated tokens/s)",
                ["batch", "engine", "engine decode-only", "transformers", "engine/HF",
                 "same tokens"], rows, fmt)

    peak = result["peak_gemm"]
    rows = []
    for b, e in per_batch.items():
        eng = median(e["engine_tokens_per_s"])
        eng_dec = median(e["engine_decode_tokens_per_s"])
        rows.append([
            str(b),
            ms(e["gemm_decode_step_s"]["total"]),
            f"{e['gemm_decode_flops_per_s'] / 1e9:.1f}",
            f0(e["floor_workload_tokens_per_s"]), pct(eng / e["floor_workload_tokens_per_s"]),
            f0(e["floor_decode_tokens_per_s"]), pct(eng_dec / e["floor_decode_tokens_per_s"]),
            f0(e["peak_floor_workload_tokens_per_s"]),
            pct(eng / e["peak_floor_workload_tokens_per_s"]),
        ])
    print_table(
        f"Matmul floor (peak: {peak['size']}^3 torch.mm = {peak['flops_per_s'] / 1e9:.1f} "
        "GFLOP/s)",
        ["batch", "GEMM ms/decode step", "GEMM GFLOP/s", "workload floor tok/s",
         "engine % of it", "decode floor tok/s", "engine decode % of it",
         "peak floor tok/s", "engine % of peak floor"], rows, fmt)
    print("  GEMM ms/decode step: the model's matmuls alone (torch.mm at its own weights, "
          "M = batch rows); decode floor = batch / that.")
    print("  workload floor: same matmuls for the whole run (prefill M = batch*prompt, then "
          "output-1 decode steps); engine % = engine tokens/s / floor tokens/s.")
    print("  peak floor: the workload's matmul FLOPs (LlamaArgs.matmul_flops_per_token) "
          "at the 2048^3 torch.mm rate.")

    breakdowns = result.get("decode_step_breakdown")
    if breakdowns:
        print_breakdowns(breakdowns, per_batch, fmt)

    triton = result.get("triton")
    if triton:
        engine_tps = median(triton["engine_tokens_per_s"])
        rows = [
            ["in-process engine", f0(engine_tps), "100%", "", ""],
            ["Triton, stream=true (1 response/token)", f0(median(triton["triton_tokens_per_s"])),
             pct(triton["ratio_of_medians"]), ", ".join(pct(r) for r in triton["pair_ratios"]),
             str(triton["same_text_as_engine"])],
            ["Triton, stream=false (1 response/request; diagnostic)",
             f0(median(triton["unstreamed_tokens_per_s"])),
             pct(triton["unstreamed_ratio_of_medians"]), "",
             str(triton["unstreamed_same_text_as_engine"])],
        ]
        print_table(f"Triton vs in-process at {triton['concurrency']} concurrent requests "
                    "(generated tokens/s; runs interleaved)",
                    ["path", "tokens/s", "of in-process", "per-pair ratios", "same text"],
                    rows, fmt)
        engine_cpu, server_cpu = (triton["engine_cpu_s_per_token"],
                                  triton["server_cpu_s_per_token"])
        print_table(
            "CPU time per generated token (stream=true runs; the client's CPU excluded)",
            ["path", "CPU ms/token", "in-process / Triton"],
            [["in-process engine (this process)", ms(engine_cpu), "100%"],
             ["tritonserver + Python backend stub", ms(server_cpu),
              pct(engine_cpu / server_cpu)]],
            fmt)
        closed = median(triton["closed_loop_engine_tokens_per_s"])
        print_table(
            f"Steady state: concurrency {triton['concurrency']} kept full (closed loop), "
            "generated tokens/s; runs interleaved",
            ["path", "tokens/s", "of in-process", "per-pair ratios"],
            [["in-process engine, closed loop", f0(closed), "100%", ""],
             ["Triton, perf_analyzer --streaming (C++ client)",
              f0(median(triton["perf_analyzer_tokens_per_s"])),
              pct(triton["perf_analyzer_ratio_of_medians"]),
              ", ".join(pct(r) for r in triton["perf_analyzer_pair_ratios"])]],
            fmt)

if __name__ == "__main__":
    sys.exit(main())
