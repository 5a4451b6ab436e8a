"""Engine instances moving a request between them (``EngineInstance.migrate_out`` and
``stage_in``, the destination reached by direct calls): a committed move continues on the
destination with the unmoved text, a failed one resumes on the source, and a
reservation whose source went silent is freed."""

from __future__ import annotations

import time

import pytest
from cluster_helpers import GREEDY, PROMPT, SEEDED, engine_config, wait_until

from preemptserve.cluster.instance import EngineInstance, Peer
from preemptserve.cluster.migration import MigrationConfig, MigrationStatus
from preemptserve.cluster.ray_cluster import InstanceDied
from preemptserve.engine.outputs import RequestOutput

RESERVATION_TIMEOUT_S = 1.0
STAGED = MigrationConfig(max_stages=4, last_stage_max_blocks=2)
IDLE = {"device": 0, "host": 0, "requests": 0, "detached": 0}


@pytest.fixture(scope="module")
def pair(default_model_dir):
    """(source, destination)."""
    instances = [EngineInstance(i, engine_config(default_model_dir), torch_threads=1,
                                reservation_timeout_s=RESERVATION_TIMEOUT_S,
                                stats_period_s=0.02) for i in range(2)]
    try:
        yield instances
    finally:
        for instance in instances:
            instance.shutdown()


def direct(destination: EngineInstance, fail=lambda method, args: False) -> Peer:
    """``destination`` as a move's peer, by plain calls; ``fail(method, args)``: that call
    raises, as a call to a dead process would."""
    def call(method: str, *args):
        if fail(method, args):
            raise InstanceDied("engine instance 1 died: test")
        return getattr(destination, method)(*args)

    return Peer(call)


class Polled:
    """What polls of one instance returned, in order."""

    def __init__(self, instance: EngineInstance) -> None:
        self.instance = instance
        self.outputs: list[RequestOutput] = []
        self.migrations: list = []

    def poll(self, max_wait_s: float = 0.05) -> None:
        report = self.instance.poll(max_wait_s)
        assert report.instance_id == self.instance.instance_id and report.failure is None
        assert all(error is None for _, error in report.outputs)
        self.outputs += [output for output, _ in report.outputs]
        self.migrations += report.migrations

    def until(self, condition, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition(self.outputs):
            assert time.monotonic() < deadline, f"{len(self.outputs)} outputs only"
            self.poll()

    @property
    def numbers(self) -> list[int]:
        return [output.num_output_tokens for output in self.outputs]

    @property
    def text(self) -> str:
        return "".join(output.text for output in self.outputs)


def finished(outputs: list[RequestOutput]) -> bool:
    return bool(outputs) and outputs[-1].finished


def assert_idle(*instances: EngineInstance) -> None:
    wait_until(lambda: all(i.block_usage() == IDLE for i in instances), 10, "idle instances")


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_committed_move_continues_on_the_destination(pair, reference, sampling):
    source, destination = pair
    request_id = f"moved-{sampling.greedy}"
    expected = reference(PROMPT, sampling)
    on_source, on_destination = Polled(source), Polled(destination)
    source.add_request(request_id, PROMPT, sampling)
    on_source.until(lambda outputs: len(outputs) >= 5)

    result = source.migrate_out(request_id, direct(destination), STAGED)
    assert result.status is MigrationStatus.COMMITTED, result
    assert result.num_stages >= 2 and result.num_blocks >= 4 and result.num_bytes > 0
    on_destination.until(finished)
    on_source.poll(0.1)
    assert on_source.migrations == [(request_id, result)]
    moved_at = len(on_source.outputs)
    assert on_source.numbers == list(range(1, moved_at + 1))
    assert on_destination.numbers == list(range(moved_at + 1, sampling.max_tokens + 1))
    assert not any(output.finished for output in on_source.outputs)
    assert on_source.text + on_destination.text == expected
    on_source.poll(0.1)  # nothing more from the source once it moved
    assert len(on_source.outputs) == moved_at and len(on_source.migrations) == 1
    assert on_destination.outputs[-1].finish_reason == "length"
    assert_idle(source, destination)


def _hog(instance: EngineInstance) -> int:
    return instance.loop.call(lambda engine: len(engine.reserve_blocks(
        "hog", engine.block_manager.num_free_blocks))).result(10)


@pytest.mark.parametrize("case", ["out-of-blocks", "dead-at-last-stage"])
def test_a_failed_move_resumes_on_the_source(pair, reference, case):
    """The destination has no room at the first stage, or dies at the last one (the
    request stopped on the source): ABORTED_DST, and the source serves it to its end."""
    source, destination = pair
    request_id = f"not-moved-{case}"
    on_source = Polled(source)
    source.add_request(request_id, PROMPT, SEEDED)
    on_source.until(lambda outputs: len(outputs) >= 5)
    if case == "out-of-blocks":
        assert _hog(destination) > 0
        peer = direct(destination)
    else:
        peer = direct(destination, lambda method, args: method == "stage_in"
                      and args[4] is not None)  # the last stage carries the snapshot
    try:
        result = source.migrate_out(request_id, peer, STAGED)
    finally:
        destination.release_reservation("hog")
    assert result.status is MigrationStatus.ABORTED_DST, result
    if case == "out-of-blocks":
        assert result.num_stages == 1 and "out of blocks" in result.reason
    else:
        assert result.num_stages >= 2 and "destination failed" in result.reason
    on_source.until(finished)
    assert on_source.migrations == [(request_id, result)]
    assert on_source.numbers == list(range(1, SEEDED.max_tokens + 1))
    assert on_source.text == reference(PROMPT, SEEDED)
    assert destination.poll(0.0).outputs == []
    assert_idle(source, destination)


def test_a_reservation_whose_source_went_silent_is_freed(pair):
    _, destination = pair

    def block_data(num_blocks: int):
        tensors = destination.loop.call(
            lambda engine: engine.read_blocks(list(range(num_blocks)), False)).result(10)
        return [tensor.numpy().copy() for tensor in tensors]

    started = time.monotonic()
    # Non-last stages of two moves: one source dies, the other keeps calling.
    assert destination.stage_in("orphan", False, block_data(2), 2, None) == ""
    assert destination.stage_in("alive", False, block_data(1), 1, None) == ""
    assert destination.block_usage()["device"] == 3
    while destination.block_usage()["device"] == 3:
        assert time.monotonic() - started < RESERVATION_TIMEOUT_S + 5, "never freed"
        assert destination.stage_in("alive", False, [], 0, None) == ""  # still there
        time.sleep(0.1)
    assert time.monotonic() - started >= RESERVATION_TIMEOUT_S
    assert destination.block_usage()["device"] == 1  # the live move's blocks stay
    destination.release_reservation("alive")
    assert_idle(destination)
