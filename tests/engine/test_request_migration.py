"""One request moved between two engines (same weights, one process) continues with
exactly the tokens and text it would have produced unmoved: greedy and seeded sampling,
from either tier, in the middle of a chunked prefill, under every policy. The move is
the engine's migration seams only: export, read blocks, reserve, write, import, finish.
"""

from __future__ import annotations

import os
import pickle

import pytest
from engine_helpers import block_bytes, random_prompts

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import RequestStatus, SamplingParams
from preemptserve.core.scheduler import BlockSwap, SchedulerOutput
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.engine.migration import RequestSnapshot
from preemptserve.sim.cost_model import IterationCostModel

POLICIES = ("fcfs", "skip_join_mlfq", "apt")
BLOCK_SIZE = 8
MAX_NUM_TOKENS = 16  # a 40-token prompt takes three prefill chunks
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=1234)


@pytest.fixture(scope="module")
def cost_model_path(tmp_path_factory):
    """A saved cost model: policies that need one skip measuring at startup."""
    path = tmp_path_factory.mktemp("migration") / "cost-model.json"
    IterationCostModel(fixed_s=0.01, per_prefill_token_s=1e-4, per_sampled_token_s=1e-3,
                       kv_bytes_per_token=1, hidden_recompute_s_per_block=0.004).save(path)
    return path


@pytest.fixture(scope="module", params=POLICIES)
def engines(request, default_model_dir, cost_model_path):
    """(reference, source, destination): three engines of one policy and one model."""
    block = block_bytes(default_model_dir, BLOCK_SIZE)

    def make() -> LLMEngine:
        return LLMEngine(EngineConfig(
            model_dir=str(default_model_dir), device="cpu",
            prefill_profile_path=str(cost_model_path),
            scheduler=SchedulerConfig(policy=request.param, max_batch_size=4,
                                      max_num_batched_tokens=MAX_NUM_TOKENS),
            cache=CacheConfig(kv_cache_bytes=48 * block, block_size=BLOCK_SIZE,
                              host_kv_cache_bytes=48 * block),
        ))

    return make(), make(), make()


def run(engine: LLMEngine, outputs: dict[str, list], max_steps: int | None = None) -> None:
    """Step until nothing is left (or ``max_steps`` steps); collect (token ids, text)."""
    num_steps = 0
    while engine.has_unfinished_requests() and num_steps != max_steps:
        num_steps += 1
        for out in engine.step():
            ids, text = outputs.setdefault(out.request_id, ([], []))
            ids.extend(out.token_ids)
            text.append(out.text)
        engine.block_manager.check_invariants()


def start(reference: LLMEngine, source: LLMEngine, request_id: str, prompt: list[int],
          sampling: SamplingParams, steps: int) -> tuple[dict[str, list], dict[str, list]]:
    """The unmoved run on ``reference`` to its end, and ``steps`` steps on ``source``."""
    expected: dict[str, list] = {}
    reference.add_request(request_id, prompt, sampling)
    run(reference, expected)
    got: dict[str, list] = {}
    source.add_request(request_id, prompt, sampling)
    run(source, got, max_steps=steps)
    return expected, got


def started_and_exported(source: LLMEngine, request_id: str, prompt: list[int],
                         steps: int) -> RequestSnapshot:
    source.add_request(request_id, prompt, GREEDY)
    run(source, {}, max_steps=steps)
    return source.export_request(request_id)


def move(source: LLMEngine, destination: LLMEngine, request_id: str) -> None:
    snapshot = source.export_request(request_id)
    assert snapshot.request_id not in source.scheduler.requests
    on_host, block_ids = source.request_blocks(request_id)
    assert (on_host, len(block_ids)) == (snapshot.on_host, snapshot.num_blocks)
    reserved = destination.reserve_blocks(request_id, len(block_ids), on_host)
    assert reserved is not None
    if block_ids:
        destination.write_blocks(reserved, on_host, source.read_blocks(block_ids, on_host))
    destination.import_request(snapshot)
    source.finish_export(request_id)


def assert_unmoved(got: dict[str, list], expected: dict[str, list], request_id: str) -> None:
    assert got[request_id][0] == expected[request_id][0], "tokens differ from the unmoved run"
    assert "".join(got[request_id][1]) == "".join(expected[request_id][1]), "text differs"


def swap_to_host(engine: LLMEngine, request_id: str) -> None:
    """Move a request's KV to the host tier as a policy's swap-out would."""
    pairs = engine.block_manager.swap_out(request_id, reuse_now=True)
    assert pairs is not None
    engine.executor.execute(SchedulerOutput(step_id=0, scheduled=(), swap_out=(
        BlockSwap(request_id, tuple(pairs), blocking=True),)), {})


def assert_idle(*engines: LLMEngine) -> None:
    for engine in engines:
        bm = engine.block_manager
        bm.commit_pending()
        bm.check_invariants()
        assert bm.num_free_blocks == bm.num_blocks, "a device block leaked"
        assert bm.num_free_host_blocks == bm.num_host_blocks, "a host block leaked"
        assert not engine.scheduler.requests and not engine.scheduler.detached


CASES = {
    # name: (sampling, prompt length, steps before the move, to the host tier first)
    "greedy-decoding": (GREEDY, 20, 6, False),
    "seeded-decoding": (SEEDED, 20, 6, False),
    "seeded-from-host-tier": (SEEDED, 20, 6, True),
    "greedy-mid-chunked-prefill": (GREEDY, 40, 1, False),
    "seeded-mid-chunked-prefill": (SEEDED, 40, 2, False),
    "greedy-from-host-tier-mid-prefill": (GREEDY, 40, 1, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moved_request_continues_exactly(engines, case):
    reference, source, destination = engines
    sampling, prompt_len, steps_before, to_host = CASES[case]
    prompt = random_prompts(len(case), [prompt_len])[0]
    request_id = f"{case}-{source.scheduler.policy_name}"

    expected, got = start(reference, source, request_id, prompt, sampling, steps_before)
    request = source.scheduler.requests[request_id]
    if prompt_len > MAX_NUM_TOKENS and steps_before * MAX_NUM_TOKENS < prompt_len:
        assert 0 < request.num_computed_tokens < prompt_len, "not in the middle of a prefill"
    else:
        assert request.num_output_tokens > 1, "not decoding yet"
    if to_host:
        swap_to_host(source, request_id)

    move(source, destination, request_id)
    assert not source.has_unfinished_requests()
    run(destination, got)

    assert_unmoved(got, expected, request_id)
    assert_idle(reference, source, destination)


def test_priority_moves_with_the_request(engines):
    reference, source, destination = engines
    prompt = random_prompts(11, [20])[0]
    request_id = f"high-{source.scheduler.policy_name}"
    source.add_request(request_id, prompt, GREEDY, priority="high")
    run(source, {}, max_steps=3)
    snapshot = source.export_request(request_id)
    assert snapshot.priority == "high"
    source.cancel_export(request_id)
    move(source, destination, request_id)
    assert destination.scheduler.requests[request_id].priority == "high"
    run(destination, {})
    # A snapshot from before priorities existed (no such attribute) reads "normal".
    old = pickle.loads(pickle.dumps(snapshot))
    del old.__dict__["priority"]
    assert old.priority == "normal" and old.to_request(0.0).priority == "normal"
    with pytest.raises(ValueError, match="priority"):
        source.add_request("bad-priority", prompt, GREEDY, priority="urgent")
    assert_idle(reference, source, destination)


def test_cancelled_export_resumes_on_the_source(engines):
    reference, source, destination = engines
    prompt = random_prompts(7, [24])[0]
    request_id = f"cancelled-{source.scheduler.policy_name}"
    expected, got = start(reference, source, request_id, prompt, SEEDED, steps=5)
    snapshot = source.export_request(request_id)
    assert source.scheduler.detached[request_id][0].status is RequestStatus.MIGRATING
    assert source.step() == []  # not scheduled while it is being moved
    reserved = destination.reserve_blocks(request_id, snapshot.num_blocks)
    assert reserved is not None
    destination.release_reservation(request_id)  # the destination gives up
    source.cancel_export(request_id)
    run(source, got)
    assert got[request_id][0] == expected[request_id][0]
    assert_idle(reference, source, destination)


def test_client_cancel_while_exported_frees_every_block(engines):
    _, source, destination = engines
    request_id = f"aborted-{source.scheduler.policy_name}"
    snapshot = started_and_exported(source, request_id, random_prompts(3, [30])[0], steps=4)
    on_host, block_ids = source.request_blocks(request_id)
    assert block_ids and source.block_manager.is_pinned(request_id)
    data = source.read_blocks(block_ids, on_host)
    output = source.abort_request(request_id)
    assert output is not None and output.finish_reason == "abort"
    reserved = destination.reserve_blocks(request_id, snapshot.num_blocks)
    destination.write_blocks(reserved, False, data)
    destination.release_reservation(request_id)
    assert_idle(source, destination)


def test_import_refuses_a_request_without_its_blocks(engines):
    _, source, destination = engines
    request_id = f"refused-{source.scheduler.policy_name}"
    snapshot = started_and_exported(source, request_id, random_prompts(5, [20])[0], steps=3)
    with pytest.raises(ValueError, match="reserved"):
        destination.import_request(snapshot)  # nothing reserved or written
    source.cancel_export(request_id)
    run(source, {})
    assert_idle(source, destination)


@pytest.mark.parametrize("to_host", [False, True], ids=["device-tier", "host-tier"])
def test_moved_between_tensor_parallel_engines(default_model_dir, to_host):
    """Each rank's slice of the blocks moves: TP=2 to TP=2 gives the unmoved tokens.

    One process holds one tensor-parallel engine at a time (rank 0 owns the default
    process group; instances run in processes of their own), so the source hands over
    and stops before the destination starts.
    """
    block = block_bytes(default_model_dir, BLOCK_SIZE)

    def make(tp: int) -> LLMEngine:
        return LLMEngine(EngineConfig(
            model_dir=str(default_model_dir), device="cpu", tensor_parallel_size=tp,
            scheduler=SchedulerConfig(policy="fcfs", max_batch_size=4,
                                      max_num_batched_tokens=MAX_NUM_TOKENS),
            cache=CacheConfig(kv_cache_bytes=48 * block, block_size=BLOCK_SIZE,
                              host_kv_cache_bytes=48 * block)))

    def stopped(engine: LLMEngine) -> None:
        pids = engine.executor.worker_pids
        engine.shutdown()
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)

    prompt = random_prompts(11, [20])[0]
    expected: dict[str, list] = {}
    reference = make(1)
    reference.add_request("r", prompt, GREEDY)
    run(reference, expected)

    got: dict[str, list] = {}
    source = make(2)
    try:
        source.add_request("r", prompt, GREEDY)
        run(source, got, max_steps=6)
        if to_host:
            swap_to_host(source, "r")
        snapshot = source.export_request("r")
        on_host, block_ids = source.request_blocks("r")
        data = source.read_blocks(block_ids, on_host)
        assert len(data) == 2 and on_host == to_host  # one slice per rank
        source.finish_export("r")
        assert_idle(source)
    finally:
        stopped(source)

    destination = make(2)
    try:
        reserved = destination.reserve_blocks("r", len(block_ids), on_host)
        assert reserved is not None
        destination.write_blocks(reserved, on_host, data)
        destination.import_request(snapshot)
        run(destination, got)
        assert_unmoved(got, expected, "r")
        assert_idle(destination)
    finally:
        stopped(destination)
