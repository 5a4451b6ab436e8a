"""Reading and writing given KV blocks of either tier on every rank (moving a request).

Every test that starts ranks checks that no worker process is left behind.
"""

from __future__ import annotations

import pytest
import torch
from test_tp_engine import assert_no_workers_left, make_engine

from preemptserve.core.request import SamplingParams
from preemptserve.engine.tp_executor import RankFailure
from preemptserve.model.args import LlamaArgs


def shapes(model_dir, tp: int, n: int) -> tuple[int, ...]:
    args = LlamaArgs.from_model_dir(model_dir)
    return (args.num_layers, 2, n, 8, args.num_kv_heads // tp, args.head_dim)


@pytest.mark.parametrize("tp", [1, 2])
def test_written_blocks_read_back_equal_in_both_tiers(default_model_dir, tp):
    engine = make_engine(default_model_dir, tp, "fcfs", num_blocks=12, num_host_blocks=10)
    try:
        executor = engine.executor
        generator = torch.Generator().manual_seed(tp)
        for on_host, ids in ((False, [3, 0, 11]), (True, [9, 2])):
            data = [torch.randn(shapes(default_model_dir, tp, len(ids)), generator=generator)
                    for _ in range(tp)]
            executor.write_blocks(ids, on_host, data)
            back = executor.read_blocks(ids, on_host)
            assert len(back) == tp
            for rank in range(tp):
                assert back[rank].device.type == "cpu"
                assert torch.equal(back[rank], data[rank]), (on_host, rank)
            # One block at a time, in another order: the same contents.
            last = executor.read_blocks(ids[-1:], on_host)[0]
            assert torch.equal(last[:, :, 0], data[0][:, :, -1])
        # The tiers are separate pools: host block 2 did not overwrite device block 2.
        assert not torch.equal(executor.read_blocks([2], False)[0],
                               executor.read_blocks([2], True)[0])
        # Bad arguments change nothing and leave the executor healthy.
        with pytest.raises(ValueError, match="no device blocks"):
            executor.read_blocks([12], on_host=False)
        with pytest.raises(ValueError, match="no host blocks"):
            executor.read_blocks([10], on_host=True)
        with pytest.raises(ValueError, match="given twice"):
            executor.read_blocks([1, 1], on_host=False)
        with pytest.raises(ValueError, match="shape"):
            executor.write_blocks([1], False, [torch.zeros(2, 2)] * tp)
        with pytest.raises(ValueError):
            executor.write_blocks([1], False, [torch.zeros(shapes(default_model_dir, tp, 1))]
                                  * (tp + 1))
        assert executor.failure is None
        # The engine still serves after writes to blocks nobody held.
        engine.add_request("after", [1, 5, 9, 13], SamplingParams(max_tokens=3))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.shutdown()
    assert_no_workers_left()


def test_each_rank_reads_its_own_heads_of_a_running_request(default_model_dir):
    """TP=2's two slices of a request's blocks are TP=1's blocks split by KV head."""
    prompt = [1] + [7 + 3 * i for i in range(20)]  # 21 tokens: 3 blocks of 8
    contents = {}
    for tp in (1, 2):
        engine = make_engine(default_model_dir, tp, "fcfs", num_blocks=12)
        try:
            engine.add_request("r", prompt, SamplingParams(max_tokens=4, min_length=4))
            engine.step()  # the prefill: its K/V are in the blocks now
            ids = engine.block_manager.block_ids("r")
            contents[tp] = engine.executor.read_blocks(ids, on_host=False)
        finally:
            engine.shutdown()
    (whole,), halves = contents[1], contents[2]
    assert whole.shape == shapes(default_model_dir, 1, 3)
    assert halves[0].shape == halves[1].shape == shapes(default_model_dir, 2, 3)
    assert whole.abs().sum() > 0
    torch.testing.assert_close(torch.cat(halves, dim=4), whole)
    assert_no_workers_left()


def test_a_failing_worker_fails_the_executor(default_model_dir):
    engine = make_engine(default_model_dir, 2, "fcfs", num_blocks=8)
    try:
        executor = engine.executor
        # Rank 0's checks would refuse the float64 tensor; let it by, then rank 1 fails.
        good = torch.zeros(shapes(default_model_dir, 2, 1))
        bad = good.to(torch.float64)
        original = executor.shard.swapper.check_block_data
        executor.shard.swapper.check_block_data = lambda ids, data: None  # rank 0 lets it by
        try:
            with pytest.raises(RankFailure):
                executor.write_blocks([0], False, [good, bad])
        finally:
            executor.shard.swapper.check_block_data = original
        assert executor.failure is not None and "rank 1" in executor.failure
        assert engine.failure == executor.failure
        with pytest.raises(RankFailure):
            executor.read_blocks([0], on_host=False)
    finally:
        engine.shutdown()
    assert_no_workers_left()
