"""Staged live migration between two engines in one process (cluster/migration.py).

A request moved in stages while it keeps decoding on the source produces exactly the
tokens and text of an unmoved run, under every policy, greedy and seeded, from either
tier; every abort path leaves both engines with every block accounted for.
"""

from __future__ import annotations

import pytest
from engine_helpers import block_bytes, random_prompts
from test_request_migration import (
    GREEDY,
    assert_idle,
    assert_unmoved,
    run,
    start,
    swap_to_host,
)

from preemptserve.cluster.migration import MigrationConfig, MigrationStatus, StagedMigration
from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.sim.cost_model import IterationCostModel

BLOCK_SIZE = 8
POLICIES = ("fcfs", "skip_join_mlfq", "apt")
# A 40-token prompt fills 5 blocks: with at most 2 blocks in the last stage, a move takes
# two or three stages.
STAGED = MigrationConfig(max_stages=4, last_stage_max_blocks=2)
LONG = SamplingParams(max_tokens=40, temperature=0.9, top_k=40, seed=7)


@pytest.fixture(scope="module", params=POLICIES)
def engines(request, default_model_dir, tmp_path_factory):
    """(reference, source, destination) of one policy."""
    path = tmp_path_factory.mktemp("staged") / "cost-model.json"
    IterationCostModel(fixed_s=0.01, per_prefill_token_s=1e-4, per_sampled_token_s=1e-3,
                       kv_bytes_per_token=1, hidden_recompute_s_per_block=0.004).save(path)
    block = block_bytes(default_model_dir, BLOCK_SIZE)

    def make() -> LLMEngine:
        return LLMEngine(EngineConfig(
            model_dir=str(default_model_dir), device="cpu", prefill_profile_path=str(path),
            scheduler=SchedulerConfig(policy=request.param, max_batch_size=4,
                                      max_num_batched_tokens=64),
            cache=CacheConfig(kv_cache_bytes=32 * block, block_size=BLOCK_SIZE,
                              host_kv_cache_bytes=32 * block)))

    return make(), make(), make()


def migrate(source: LLMEngine, migration: StagedMigration, got: dict[str, list]):
    """Step the source and the migration in turn, as the source's engine loop would."""
    while (result := migration.step()) is None:
        run(source, got, max_steps=1)
    return result


@pytest.mark.parametrize("sampling", [GREEDY, LONG], ids=["greedy", "seeded"])
def test_staged_move_continues_exactly(engines, sampling):
    reference, source, destination = engines
    prompt = random_prompts(21, [40])[0]
    request_id = f"staged-{sampling.greedy}-{source.scheduler.policy_name}"
    expected, got = start(reference, source, request_id, prompt, sampling, steps=2)
    result = migrate(source, StagedMigration(source, destination, request_id, STAGED), got)
    assert result.status is MigrationStatus.COMMITTED, result
    assert result.num_stages >= 2, "not a staged move"
    assert request_id not in source.scheduler.requests
    run(destination, got)
    assert_unmoved(got, expected, request_id)
    assert_idle(reference, source, destination)


@pytest.mark.parametrize("sampling", [GREEDY, LONG], ids=["greedy", "seeded"])
def test_a_waiting_request_moves_with_nothing_to_copy(engines, sampling):
    """The FCW request policies move requests holding no cache: one stage, no block."""
    reference, source, destination = engines
    prompt = random_prompts(23, [40])[0]
    request_id = f"waiting-{sampling.greedy}-{source.scheduler.policy_name}"
    expected, got = start(reference, source, request_id, prompt, sampling, steps=0)
    assert request_id in source.scheduler.migration_candidates(include_waiting=True)
    assert request_id not in source.scheduler.migration_candidates()
    result = migrate(source, StagedMigration(source, destination, request_id, STAGED), got)
    assert result.status is MigrationStatus.COMMITTED, result
    assert (result.num_stages, result.num_bytes) == (1, 0)
    run(destination, got)
    assert_unmoved(got, expected, request_id)
    assert_idle(reference, source, destination)


def test_a_swapped_out_request_moves_host_tier_to_host_tier_in_one_stage(engines):
    reference, source, destination = engines
    prompt = random_prompts(22, [40])[0]
    request_id = f"host-{source.scheduler.policy_name}"
    expected, got = start(reference, source, request_id, prompt, LONG, steps=3)
    swap_to_host(source, request_id)
    result = StagedMigration(source, destination, request_id, STAGED).step()
    assert result is not None and result.status is MigrationStatus.COMMITTED
    assert result.num_stages == 1
    assert destination.block_manager.is_on_host(request_id)
    run(destination, got)
    assert got[request_id][0] == expected[request_id][0]
    assert_idle(reference, source, destination)


def _abort_case(engines, seed: int, prepare, expect: MigrationStatus,
                config: MigrationConfig = STAGED):
    """Start a staged move, let ``prepare(source, destination, request_id, stage)`` break
    it at some stage, and check the outcome: the request finishes somewhere with exactly
    the unmoved tokens (or was cancelled), and no block leaks."""
    reference, source, destination = engines
    prompt = random_prompts(seed, [40])[0]
    request_id = f"abort{seed}-{source.scheduler.policy_name}"
    expected, got = start(reference, source, request_id, prompt, LONG, steps=2)
    migration = StagedMigration(source, destination, request_id, config)
    stage = 0
    while (result := migration.step()) is None:
        stage += 1
        prepare(source, destination, request_id, stage)
        run(source, got, max_steps=1)
    assert result.status is expect, result
    assert not destination.block_manager.has_blocks(request_id)
    assert not destination.block_manager.reserved_blocks(request_id)
    run(source, got)
    if expect is MigrationStatus.ABORTED_DST:  # it resumed on the source, unharmed
        assert_unmoved(got, expected, request_id)
    elif request_id in source.scheduler.requests or got.get(request_id, ([], []))[0]:
        assert got[request_id][0] == expected[request_id][0][:len(got[request_id][0])]
    return result


def test_source_finished_between_stages(engines):
    def cancel(source, destination, request_id, stage):
        if stage == 1:
            source.abort_request(request_id)

    result = _abort_case(engines, 31, cancel, MigrationStatus.ABORTED_SRC)
    assert "finished" in result.reason
    assert_idle(*engines)


def test_source_preempted_between_stages(engines):
    if engines[1].scheduler.policy_name == "fcfs":
        pytest.skip("fcfs never swaps a request out (it preempts by recomputation only)")

    def swap(source, destination, request_id, stage):
        if stage == 1:
            swap_to_host(source, request_id)

    result = _abort_case(engines, 32, swap, MigrationStatus.ABORTED_SRC)
    assert "blocks moved" in result.reason
    assert_idle(*engines)


def test_too_many_stages(engines):
    result = _abort_case(engines, 33, lambda *args: None, MigrationStatus.ABORTED_SRC,
                         MigrationConfig(max_stages=1, last_stage_max_blocks=0))
    assert "stages" in result.reason
    assert_idle(*engines)


@pytest.mark.parametrize("at_stage", [1, 2], ids=["first-stage", "last-stage"])
def test_destination_out_of_blocks(engines, at_stage):
    _, _, destination = engines
    bm = destination.block_manager

    # Take every free block of the destination before the stage that must fail.
    def take_all(source, dest, request_id, stage):
        if stage == at_stage - 1:
            assert dest.reserve_blocks("hog", bm.num_free_blocks) is not None

    if at_stage == 1:
        assert destination.reserve_blocks("hog", bm.num_free_blocks) is not None
    try:
        result = _abort_case(engines, 34 + at_stage, take_all, MigrationStatus.ABORTED_DST)
    finally:
        destination.release_reservation("hog")
    assert "out of blocks" in result.reason
    assert_idle(*engines)


def test_destination_refuses_at_commit(engines):
    _, source, destination = engines
    request_id = f"abort36-{source.scheduler.policy_name}"
    destination.add_request(request_id, "a request of the same id", GREEDY)
    try:
        result = _abort_case(engines, 36, lambda *args: None, MigrationStatus.ABORTED_DST)
    finally:
        destination.abort_request(request_id)
    assert "refused at commit" in result.reason
    assert_idle(*engines)
