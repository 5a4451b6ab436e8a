"""Derive a cost model of a published GPU setup: Llama-2-7B, fp16, one A100, vLLM.

Run once; the result ships as ``sim/profiles/llama2-7b-a100.json``::

    git clone https://github.com/microsoft/vidur   # commit 7d47513 (2024-11-19) was used
    python -m preemptserve.sim.published \\
        vidur/data/profiling/compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv

Sources and derivation (every number below is either read from the cited file or a
datasheet value, nothing is tuned):

* Linear layers, norms, RoPE, activation and residual adds: Vidur's measured per-layer
  operator times on an A100 (``mlp.csv`` above; Agrawal et al., "Vidur: A Large-Scale
  Simulation Framework for LLM Inference", MLSys 2024), TP 1, the median of each
  operator, summed per layer x 32 layers, as Vidur's own ``ExecutionTime.model_time``
  does (embedding and LM head excluded there too). ``fixed_s`` + ``per token`` is then a
  least-squares fit, on relative error, over 1 to 4,096 batched tokens; it serves both
  prefill and decode tokens (the same matrices process both).
* CPU overhead per iteration: Vidur's ``data/profiling/a100/cpu_overheads.csv`` (commit
  0633efa), Llama-2-7b, TP 1, batch 8 to 64: the medians of schedule + sampler +
  prepare inputs + process model outputs, fitted as fixed + per sampled token
  (``CPU_OVERHEAD_MS`` below holds those medians).
* Attention is not in that data (the attention profiles are stored outside git), so it is
  a roofline at the A100-SXM4-80GB datasheet peaks, a lower bound: decode attention reads
  K and V of every context token (2 x 32 layers x 4,096 x 2 bytes = 512 KiB per token)
  at 2,039 GB/s; prefill attention does 4 x 4,096 x 32 FLOPs per (query, key) pair at
  312 TFLOP/s, halved because our feature counts the whole chunk x context rectangle
  and causal attention computes half of it.
* Swaps: PCIe 4.0 x16 at its 32 GB/s nominal rate, overlapped with compute (a CUDA copy
  stream), no fixed cost measured.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from .cost_model import IterationCostModel

NUM_LAYERS = 32
HIDDEN = 4096
KV_BYTES_PER_TOKEN = 2 * NUM_LAYERS * HIDDEN * 2  # K and V, fp16
HBM_BYTES_PER_S = 2.039e12
PEAK_FLOPS = 312e12
PCIE_BYTES_PER_S = 32e9
OPERATORS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
# Vidur cpu_overheads.csv, Llama-2-7b, TP 1: batch size -> medians (ms) of SCHEDULE,
# SAMPLER_E2E, PREPARE_INPUTS_E2E, PROCESS_MODEL_OUTPUTS.
CPU_OVERHEAD_MS = {
    8: (0.16513, 0.88781, 0.29317, 0.62438),
    16: (0.27832, 0.94459, 0.43911, 1.13542),
    24: (0.38175, 0.95600, 0.53633, 1.63395),
    32: (0.57984, 1.12637, 0.67099, 2.24566),
    40: (0.61693, 1.07573, 0.79215, 2.65117),
    48: (0.74156, 1.16300, 0.91485, 3.23167),
    56: (0.83946, 1.24732, 1.03977, 3.60745),
    64: (0.95218, 1.37026, 1.16300, 4.10826),
}


def layer_times_ms(mlp_csv: Path) -> dict[int, float]:
    """num_tokens -> summed median operator time of one layer (ms), TP 1."""
    out: dict[int, float] = {}
    with open(mlp_csv, newline="") as f:
        for row in csv.DictReader(f):
            if int(row["num_tensor_parallel_workers"]) != 1:
                continue
            out[int(row["num_tokens"])] = sum(
                float(row[f"time_stats.{op}.median"]) for op in OPERATORS
            )
    return out


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(intercept, slope, max relative error) of a relative-error least-squares line."""
    w = 1.0 / y
    a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (intercept, slope), *_ = np.linalg.lstsq(a, y * w, rcond=None)
    error = float(np.max(np.abs((intercept + slope * x) / y - 1)))
    return float(intercept), float(slope), error


def derive(mlp_csv: Path) -> IterationCostModel:
    per_layer = layer_times_ms(mlp_csv)
    tokens = np.array(sorted(n for n in per_layer if n <= 4096), dtype=float)
    model_s = np.array([per_layer[int(n)] * NUM_LAYERS * 1e-3 for n in tokens])
    linear_fixed_s, per_token_s, linear_error = fit_line(tokens, model_s)
    batch = np.array(sorted(CPU_OVERHEAD_MS), dtype=float)
    cpu_s = np.array([sum(CPU_OVERHEAD_MS[int(b)]) * 1e-3 for b in batch])
    cpu_fixed_s, cpu_per_token_s, cpu_error = fit_line(batch, cpu_s)
    return IterationCostModel(
        fixed_s=linear_fixed_s + cpu_fixed_s,
        per_prefill_token_s=per_token_s,
        per_decode_token_s=per_token_s,
        per_decode_context_token_s=KV_BYTES_PER_TOKEN / HBM_BYTES_PER_S,
        per_prefill_attention_s=4 * HIDDEN * NUM_LAYERS / PEAK_FLOPS / 2,
        per_sampled_token_s=cpu_per_token_s,
        swap_fixed_s=0.0,
        swap_bytes_per_s=PCIE_BYTES_PER_S,
        swap_overlaps_compute=True,
        kv_bytes_per_token=KV_BYTES_PER_TOKEN,
        max_model_len=4096,
        source={
            "setup": "Llama-2-7B, fp16, 1x A100-SXM4-80GB, vLLM (as profiled by Vidur)",
            "derivation": "python -m preemptserve.sim.published <vidur>/data/profiling/"
            "compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv (see the module "
            "docstring)",
            "vidur_commit": "7d47513363ec447a741ac5e47241580b47724fbf",
            "linear_fit_points": len(tokens),
            "linear_fit_max_relative_error": linear_error,
            "cpu_overhead_fit_max_relative_error": cpu_error,
            "attention": "roofline at datasheet peaks (2,039 GB/s, 312 TFLOP/s): a lower bound",
        },
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m preemptserve.sim.published MLP_CSV [OUT_JSON]")
        return 2
    out = (
        Path(args[1])
        if len(args) > 1
        else (Path(__file__).resolve().parent / "profiles" / "llama2-7b-a100.json")
    )
    model = derive(Path(args[0]))
    model.save(out)
    print(f"wrote {out}: {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
