"""The published GPU profiles: they load, are plausible, and follow from their derivation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from preemptserve.bench.workload import synthetic
from preemptserve.core.scheduler.output import BatchShape
from preemptserve.sim import published
from preemptserve.sim.cost_model import IterationCostModel, load_profile, profile_path
from preemptserve.sim.simulator import SimConfig, Simulator

SMALL = "llama2-7b-a100"
LARGE = "llama2-70b-a100-tp4"
GIB = 2**30


def decode_step(batch: int, context: int) -> BatchShape:
    return BatchShape(num_decode_tokens=batch, decode_context_tokens=batch * context,
                      num_sampled_tokens=batch)


def test_the_profiles_load_and_name_their_source() -> None:
    for name in (SMALL, LARGE):
        model = IterationCostModel.load(profile_path(name))
        assert model == load_profile(name)
        assert model.source["vidur_commit"] == published.VIDUR_COMMIT
        assert model.source["setup"] == published.SETUPS[name].description
        assert model.source["derivation"] == published.SETUPS[name].derivation
        assert model.max_model_len == 4096 and model.swap_overlaps_compute
    large = load_profile(LARGE)
    assert large.source["tensor_parallel"] == 4
    assert large.source["linear_fit_max_relative_error"] < 0.3
    assert large.source["linear_fit_median_relative_error"] < 0.05
    assert large.source["cpu_overhead_fit_max_relative_error"] < 0.1


def test_kv_bytes_per_token_are_the_whole_models() -> None:
    # layers x (K, V) x KV heads x head dim x fp16, over all ranks
    assert load_profile(SMALL).kv_bytes_per_token == 32 * 2 * 32 * 128 * 2
    assert load_profile(LARGE).kv_bytes_per_token == 80 * 2 * 8 * 128 * 2  # GQA, 8 KV heads
    setup = published.LLAMA2_70B_A100_TP4
    assert setup.head_dim == 128 and setup.kv_bytes_per_token // setup.tensor_parallel == 81920


def test_the_larger_model_costs_more_per_step() -> None:
    small, large = load_profile(SMALL), load_profile(LARGE)
    for batch in (1, 8, 32, 64, 256):
        for context in (128, 1024, 4096):
            if batch * context > 65536:
                # 32 GiB of the 7B's KV, most of one GPU: beyond it the 7B's decode attention
                # (MHA, 512 KiB a token on one GPU) outweighs the 70B's (GQA, 80 KiB a rank).
                continue
            shape = decode_step(batch, context)
            assert large.iteration_time_s(shape) > small.iteration_time_s(shape)
    assert large.per_decode_context_token_s < small.per_decode_context_token_s
    assert large.per_decode_token_s > small.per_decode_token_s
    for tokens in (16, 512, 4096):
        assert large.prefill_time_s(tokens) > small.prefill_time_s(tokens)
    # Tensor parallel 4 over 10x the weights: a few times, not 10x, slower per step.
    ratio = (large.iteration_time_s(decode_step(32, 800))
             / small.iteration_time_s(decode_step(32, 800)))
    assert 1.5 < ratio < 5
    # Published vLLM Llama-2-70B TP4 A100 decode steps are tens of milliseconds.
    assert 0.02 < large.iteration_time_s(decode_step(1, 100)) < 0.06


def _write_mlp_csv(
    path: Path, setup: published.Setup, fixed_ms: float, per_token_ms: float
) -> None:
    """Every operator median linear in tokens at the setup's TP; other TPs are decoys."""
    ops = published.OPERATORS
    columns = [f"time_stats.{op}.median" for op in ops] + [
        "n_head", "n_kv_head", "n_embd", "num_tokens", "num_tensor_parallel_workers"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for tp in (1, 2, setup.tensor_parallel, 8):
            scale = 1.0 if tp == setup.tensor_parallel else 100.0
            for n in (1, 2, 4, *range(8, 4097, 8), 8192):
                op_ms = scale * (fixed_ms + per_token_ms * n) / len(ops)
                writer.writerow([op_ms] * len(ops) + [
                    setup.num_heads, setup.num_kv_heads, setup.hidden, n, tp])


def _write_all_reduce_csv(path: Path, fixed_ms: float, ms_per_byte: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "time_stats.all_reduce.median", "rank", "num_workers", "size",
                         "collective", "devices_per_node", "max_devices_per_node"])
        for workers, per_node in ((4, 4), (4, 2), (2, 2), (8, 8)):
            slow = 1.0 if (workers, per_node) == (4, 4) else 50.0
            for size in range(2048, 2**27, 2**20 + 8192):
                writer.writerow([0, slow * (fixed_ms + ms_per_byte * size), 0, workers, size,
                                 "all_reduce", per_node, 8])


def test_the_derivation_reproduces_a_linear_profile(tmp_path: Path) -> None:
    setup = published.LLAMA2_70B_A100_TP4
    mlp = tmp_path / "mlp.csv"
    ar = tmp_path / "a100_dgx" / "all_reduce.csv"
    _write_mlp_csv(mlp, setup, fixed_ms=0.3, per_token_ms=0.0019)
    _write_all_reduce_csv(ar, fixed_ms=0.015, ms_per_byte=8e-9)
    model = published.derive(mlp, setup, ar)
    layers, hidden = setup.num_layers, setup.hidden
    batch = np.array(sorted(setup.cpu_overhead_ms), dtype=float)
    cpu = np.array([sum(setup.cpu_overhead_ms[int(b)]) * 1e-3 for b in batch])
    cpu_fixed, cpu_per_token, _ = published.fit_line(batch, cpu)
    comm_fixed_ms = 2 * (0.015 + published.NCCL_CPU_LAUNCH_OVERHEAD_MS)
    assert model.fixed_s == pytest.approx(layers * (0.3 + comm_fixed_ms) * 1e-3 + cpu_fixed)
    per_token = layers * (0.0019 + 2 * 8e-9 * hidden * 2) * 1e-3
    assert model.per_prefill_token_s == pytest.approx(per_token)
    assert model.per_decode_token_s == pytest.approx(per_token)
    assert model.per_sampled_token_s == pytest.approx(cpu_per_token)
    assert model.source["linear_fit_max_relative_error"] < 1e-9
    assert model.source["linear_fit_points"] == 3 + 512  # tokens 1 to 4,096 only
    # What does not depend on the measured files matches the shipped profile exactly.
    shipped = load_profile(LARGE)
    for name in ("per_decode_context_token_s", "per_prefill_attention_s", "per_sampled_token_s",
                 "swap_bytes_per_s", "swap_fixed_s", "kv_bytes_per_token", "max_model_len"):
        assert getattr(model, name) == getattr(shipped, name), name
    assert shipped.per_decode_context_token_s == pytest.approx(81920 / 2.039e12)
    assert shipped.swap_bytes_per_s == 4 * 32e9


def test_the_derivation_refuses_a_mismatched_input(tmp_path: Path) -> None:
    large, small = published.LLAMA2_70B_A100_TP4, published.LLAMA2_7B_A100
    mlp7, mlp70 = tmp_path / "mlp7.csv", tmp_path / "mlp70.csv"
    _write_mlp_csv(mlp7, small, 0.1, 0.001)
    _write_mlp_csv(mlp70, large, 0.3, 0.002)
    ar = tmp_path / "a100_dgx" / "all_reduce.csv"
    _write_all_reduce_csv(ar, 0.015, 8e-9)
    with pytest.raises(ValueError, match="profiles"):
        published.derive(mlp7, large, ar)  # another model's shape
    with pytest.raises(ValueError, match="all-reduce"):
        published.derive(mlp70, large)  # TP 4 without a network profile
    other = tmp_path / "a100_pairwise_nvlink" / "all_reduce.csv"
    _write_all_reduce_csv(other, 0.015, 8e-9)
    with pytest.raises(ValueError, match="a100_dgx"):
        published.derive(mlp70, large, other)  # another node than the setup names
    assert published.derive(mlp7, small).kv_bytes_per_token == 524288


def test_the_command_writes_a_loadable_profile(tmp_path: Path) -> None:
    setup = published.LLAMA2_70B_A100_TP4
    mlp = tmp_path / "mlp.csv"
    ar = tmp_path / "a100_dgx" / "all_reduce.csv"
    _write_mlp_csv(mlp, setup, 0.3, 0.0019)
    _write_all_reduce_csv(ar, 0.015, 8e-9)
    out = tmp_path / "p.json"
    assert published.main(["--setup", LARGE, "--all-reduce", str(ar), str(mlp), str(out)]) == 0
    assert json.loads(out.read_text())["source"]["tensor_parallel"] == 4
    assert IterationCostModel.load(out) == published.derive(mlp, setup, ar)


def test_the_simulator_runs_on_the_tensor_parallel_profile() -> None:
    model = load_profile(LARGE)
    params = {"scheduler_policy": "fcfs", "kv_cache_bytes": str(150 * GIB),
              "kv_cache_host_memory_bytes": str(64 * GIB), "max_batch_size": "32",
              "max_num_tokens": "4096"}
    config = SimConfig.from_parameters(params, model)
    assert config.num_blocks == 150 * GIB // (16 * 327680)  # 30,720 blocks of 16 tokens
    workload = synthetic("sharegpt", 40, rate_rps=1.0, seed=0, max_context_tokens=4096)
    result = Simulator(config, model, workload).run()
    timelines = result.timelines()
    assert len(timelines) == 40 and not result.rejected
    tpot = [t.tpot_s for t in timelines if t.output_tokens > 1]
    assert 0.03 < float(np.median(tpot)) < 0.1  # tens of ms per output token
