"""One sizing of the block pools for the engine and the simulator (core/cache_sizes.py),
and startup profiling that still allocates under ``python -O``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from preemptserve.config import CacheConfig, serving_config_from_parameters
from preemptserve.core.cache_sizes import PoolSizes, hidden_tokens_per_block, pool_sizes
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.sim.cost_model import IterationCostModel
from preemptserve.sim.simulator import SimConfig


def test_pool_sizes_from_a_budget():
    cache = CacheConfig(kv_cache_bytes=10_000, block_size=4, host_kv_cache_bytes=2_500)
    assert pool_sizes(cache, 100, 2048, hidden_possible=True) == PoolSizes(
        block_size=4, block_bytes=400, num_blocks=25, num_host_blocks=6,
        max_model_len=100, hidden_tokens_per_block=8)
    assert hidden_tokens_per_block(4) == 8
    # The tightest of the pool, the model's positions and the configured limit.
    assert pool_sizes(cache, 100, 64, True).max_model_len == 64
    assert pool_sizes(cache, 100, 64, True, max_model_len=32).max_model_len == 32
    assert pool_sizes(cache, 100, None, True, max_model_len=0).max_model_len == 100
    assert pool_sizes(cache, 100, 2048, hidden_possible=False).hidden_tokens_per_block == 0
    off = CacheConfig(kv_cache_bytes=10_000, block_size=4, enable_hidden_cache=False)
    assert pool_sizes(off, 100, 2048, hidden_possible=True).hidden_tokens_per_block == 0
    with pytest.raises(ValueError, match="smaller than one KV block"):
        pool_sizes(CacheConfig(kv_cache_bytes=399, block_size=4), 100, 2048, True)


@pytest.mark.parametrize("hidden", [True, False])
def test_the_simulator_sizes_the_pools_as_the_engine_does(default_model_dir, hidden):
    params = {
        "model_dir": str(default_model_dir), "device": "cpu", "scheduler_policy": "fcfs",
        "kv_cache_bytes": str(40 * 2**20 + 12345), "kv_cache_host_memory_bytes": str(2**20 + 7),
        "kv_block_size": "8", "max_model_len": "300",
        "enable_hidden_cache": "true" if hidden else "false",
    }
    engine = LLMEngine(serving_config_from_parameters(params).engine)
    cost = IterationCostModel(
        fixed_s=0.01, kv_bytes_per_token=engine.kv_bytes_per_token,
        max_model_len=engine.args.max_position_embeddings,
        hidden_recompute_s_per_block=0.001,  # a profile of this (MHA) model measures one
    )
    sim = SimConfig.from_parameters(params, cost)
    bm = engine.block_manager
    assert (sim.num_blocks, sim.num_host_blocks, sim.block_size) == (
        bm.num_blocks, bm.num_host_blocks, bm.block_size)
    assert sim.max_model_len == engine.max_model_len == 300
    assert sim.hidden_tokens_per_block == bm.hidden_tokens_per_block == (16 if hidden else 0)
    assert sim.block_bytes == 8 * engine.kv_bytes_per_token


OPTIMIZED_STARTUP = """
import sys
from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.engine.llm_engine import LLMEngine
assert False, "asserts must be off here"
engine = LLMEngine(EngineConfig(
    model_dir=sys.argv[1], device="cpu",
    scheduler=SchedulerConfig(policy="apt", max_num_batched_tokens=64),
    cache=CacheConfig(kv_cache_bytes=64 * 8 * 32768, block_size=8)))
profile = engine.cost_model
print(len(profile.points), profile.hidden_recompute_s_per_block is not None,
      engine.block_manager.num_used_blocks)
"""


def test_startup_profiling_allocates_under_python_O(default_model_dir, tmp_path):
    script = tmp_path / "optimized.py"
    script.write_text(OPTIMIZED_STARTUP)
    result = subprocess.run(
        [sys.executable, "-O", str(script), str(default_model_dir)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    num_points, has_recompute_cost, blocks_in_use = result.stdout.split()
    assert int(num_points) >= 2 and has_recompute_cost == "True" and blocks_in_use == "0"
