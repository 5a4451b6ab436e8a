"""The cluster frontend over engine instances in this process (``LocalInstances``, no Ray):
a request moved mid-stream gives exactly the text of an unmoved run, outputs arrive in
token order whatever order the instances report them in, a cancel during a move ends
the request once and frees every block, a dead instance fails only its requests, and
dispatch spreads requests as its policy says."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter

import pytest
from cluster_helpers import GREEDY, PROMPT, SEEDED, Collector, engine_config, wait_until

from preemptserve.cluster.frontend import ClusterFrontend
from preemptserve.cluster.instance import EngineInstance, InstanceReport
from preemptserve.cluster.local import LocalInstances
from preemptserve.cluster.migration import MigrationResult, MigrationStatus
from preemptserve.cluster.ray_cluster import InstanceDied
from preemptserve.config import ClusterConfig
from preemptserve.core.request import SamplingParams
from preemptserve.core.scheduler.load import InstanceLoad
from preemptserve.engine.outputs import EngineStats, RequestOutput
from preemptserve.serving.engine_loop import QueueFullError

IDLE = {"device": 0, "host": 0, "requests": 0, "detached": 0}


def cluster_config(**overrides) -> ClusterConfig:
    settings = {"num_instances": 2, "dispatch_policy": "round_robin",
                "enable_migration": False, "polling_interval_ms": 20,
                "migration_last_stage_max_blocks": 2, **overrides}
    return ClusterConfig(**settings)


def make_instances(model_dir) -> LocalInstances:
    return LocalInstances([EngineInstance(i, engine_config(model_dir), torch_threads=1,
                                          reservation_timeout_s=10.0, stats_period_s=0.02)
                           for i in range(2)])


@pytest.fixture(scope="module")
def instances(default_model_dir):
    local = make_instances(default_model_dir)
    try:
        yield local
    finally:
        local.shutdown()


@pytest.fixture
def frontend_of():
    """``frontend_of(instances, **cluster settings)``: a started frontend, shut down after
    the test."""
    frontends: list[ClusterFrontend] = []

    def make(instances, **overrides) -> ClusterFrontend:
        frontend = ClusterFrontend(instances, cluster_config(**overrides),
                                   cancellation_check_period_s=0.01)
        frontend.start()
        frontends.append(frontend)
        return frontend

    yield make
    for frontend in frontends:
        frontend.shutdown()


def generated(instance: EngineInstance) -> int:
    return instance.loop.call(lambda engine: engine.get_stats()).result(10) \
        .num_generated_tokens_total


def assert_idle(local: LocalInstances) -> None:
    """Every block of every instance free, no request left (moves end a little later)."""
    wait_until(lambda: all(i.block_usage() == IDLE for i in local.instances), 10,
               "every instance idle")


# -- moves ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_moved_mid_stream_gives_the_unmoved_text(instances, frontend_of, reference,
                                                           sampling):
    expected = reference(PROMPT, sampling)
    frontend = frontend_of(instances)
    before = [generated(i) for i in instances.instances]
    got = Collector()
    request_id = frontend.submit(PROMPT, sampling, got)  # round robin: instance 0
    got.wait_for(5)
    assert frontend.migrate(request_id, 1)
    assert not frontend.migrate(request_id, 1), "a request moving already moved again"
    output, error = got.wait_done()
    assert error is None and output.finish_reason == "length"
    assert got.text == expected
    assert got.numbers == list(range(1, sampling.max_tokens + 1))
    assert len(got.finals) == 1
    wait_until(lambda: sum(frontend.stats.migrations_ended.values()) == 1, 10, "the report")
    assert frontend.stats.migrations_ended == Counter({("committed", ""): 1})
    assert sum(frontend.stats.downtime_counts) == 1 and frontend.stats.migration_bytes > 0
    on_source, on_destination = (generated(i) - b for i, b in zip(instances.instances, before,
                                                                  strict=True))
    assert 5 <= on_source < sampling.max_tokens and on_destination > 0
    assert_idle(instances)


def test_moving_to_its_owner_or_an_unknown_request_is_refused(instances, frontend_of):
    frontend = frontend_of(instances)
    assert not frontend.migrate("no such request", 1)
    got = Collector()
    request_id = frontend.submit(PROMPT, SamplingParams(max_tokens=8, min_length=8,
                                                        temperature=0.0), got)
    assert not frontend.migrate(request_id, 0)  # round robin put it on instance 0
    got.wait_done()
    assert frontend.stats.migrations_started == 0
    assert_idle(instances)


# Cancelled at once the request leaves the source before the first stage; a step or two
# later, while it is stopped for the last stage; later still, after the commit, on the
# destination. Whichever window a run hits, the request ends once and no block leaks.
@pytest.mark.parametrize("delay_s", [0.0, 0.025, 0.06])
def test_cancel_during_a_move_ends_it_once_and_frees_every_block(instances, frontend_of,
                                                                 delay_s):
    frontend = frontend_of(instances)
    got = Collector()
    request_id = frontend.submit(PROMPT, SamplingParams(max_tokens=200, min_length=200,
                                                        temperature=0.0), got)
    got.wait_for(3)
    assert frontend.migrate(request_id, 1)
    time.sleep(delay_s)
    frontend.cancel(request_id)
    output, error = got.wait_done()
    assert (output.finish_reason, error) == ("abort", None)
    wait_until(lambda: sum(frontend.stats.migrations_ended.values()) == 1, 10,
               "the move's report")
    assert_idle(instances)
    assert len(got.finals) == 1 and got.outputs[-1][0].finished
    assert len(got.numbers) < 200
    assert frontend.num_in_flight == 0


# -- a dead instance ------------------------------------------------------------------------

def test_a_killed_instance_fails_its_requests_and_the_other_serves_on(default_model_dir,
                                                                      reference):
    local = make_instances(default_model_dir)
    try:
        failures: list[str] = []
        stats_seen = []
        frontend = ClusterFrontend(local, cluster_config(), cancellation_check_period_s=0.01,
                                   on_failure=failures.append, on_stats=stats_seen.append)
        frontend.start()
        try:
            doomed = Collector()
            frontend.submit(PROMPT, SamplingParams(max_tokens=300, min_length=300,
                                                   temperature=0.0), doomed)  # instance 0
            doomed.wait_for(3)
            local.kill(0)
            output, error = doomed.wait_done(30)
            assert output.finish_reason == "error" and "instance 0" in (error or "")
            assert len(doomed.finals) == 1
            with pytest.raises(InstanceDied):
                local.poll(0, 0.0)
            wait_until(lambda: frontend.stats.num_alive == 1, 10, "the death noticed")
            expected = reference(PROMPT, GREEDY)
            survivors = [Collector() for _ in range(2)]
            for got in survivors:
                frontend.submit(PROMPT, GREEDY, got)
            for got in survivors:
                assert got.wait_done() == (got.outputs[-1][0], None)
                assert got.text == expected
            assert frontend.stats.num_alive == 1 and frontend.failure is None
            assert not failures
            # The sums keep the dead instance's counters (Prometheus counters never go
            # down), not its gauges.
            generated = [s.num_generated_tokens_total for s in stats_seen]
            assert generated == sorted(generated) and generated[-1] > 0
            assert stats_seen[-1].num_blocks_total == local.instances[1].info()["num_blocks"]

            local.kill(1)
            wait_until(lambda: frontend.failure is not None, 10, "the model to fail")
            assert "every engine instance failed" in frontend.failure
            # on_failure runs on the response sender's thread, soon after.
            wait_until(lambda: failures, 10, "on_failure called")
            assert failures == [frontend.failure]
            assert frontend.stats.num_alive == 0
            late = Collector()
            frontend.submit(PROMPT, GREEDY, late)
            output, error = late.wait_done(5)
            assert output.finish_reason == "error" and "unhealthy" in (error or "")
        finally:
            frontend.shutdown()
    finally:
        local.shutdown()


# -- dispatch -------------------------------------------------------------------------------

class Recording(LocalInstances):
    """``LocalInstances`` that remembers where each request went."""

    def __init__(self, local: LocalInstances) -> None:
        super().__init__(local.instances)
        self.sent_to: list[int] = []

    def add_request(self, instance, request_id, prompt, sampling, **kwargs) -> None:
        self.sent_to.append(instance)
        super().add_request(instance, request_id, prompt, sampling, **kwargs)


@pytest.mark.parametrize("policy", ["round_robin", "load"])
def test_dispatch_spreads_a_burst(instances, frontend_of, policy):
    recording = Recording(instances)
    frontend = frontend_of(recording, dispatch_policy=policy)
    burst = [Collector() for _ in range(4)]
    for got in burst:
        frontend.submit(PROMPT, SamplingParams(max_tokens=4, min_length=4), got)
    for got in burst:
        assert got.wait_done()[1] is None and len(got.numbers) == 4
    if policy == "round_robin":
        assert recording.sent_to == [0, 1, 0, 1]
    else:  # by freeness: neither instance takes the whole burst
        assert Counter(recording.sent_to) == Counter({0: 2, 1: 2})
    assert_idle(instances)


# -- the frontend's own rules, with scripted instances --------------------------------------

class Scripted:
    """Instances whose reports the test scripts: ``report(i, outputs, load)`` is what the
    next poll of instance ``i`` returns (or raises, for an exception)."""

    def __init__(self, num_instances: int = 2) -> None:
        self.num_instances = num_instances
        self.reports: list[queue.SimpleQueue] = [queue.SimpleQueue()
                                                 for _ in range(num_instances)]
        self.added: list[tuple[int, str]] = []
        self.aborted: list[tuple[int, str]] = []
        self.closed = threading.Event()

    def report(self, instance: int, outputs=(), load: InstanceLoad | None = None) -> None:
        self.reports[instance].put(InstanceReport(instance, list(outputs), load or _load(),
                                                  EngineStats()))

    def add_request(self, instance, request_id, prompt, sampling, **kwargs) -> None:
        self.added.append((instance, request_id))

    def abort(self, instance, request_id) -> None:
        self.aborted.append((instance, request_id))

    def poll(self, instance: int, max_wait_s: float) -> InstanceReport:
        while True:
            try:
                item = self.reports[instance].get(timeout=0.01)
            except queue.Empty:
                if self.closed.is_set():
                    return InstanceReport(instance, [], _load(), EngineStats())
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def pick_request(self, instance, policy) -> None:
        return None

    def migrate_out(self, source, destination, request_id, config) -> None:
        pass


def _load(num_used_blocks: int = 0, num_running: int = 0) -> InstanceLoad:
    return InstanceLoad(num_blocks=32, num_used_blocks=num_used_blocks,
                        num_running=num_running, num_waiting=0, head_of_line_blocks=0,
                        waiting_blocks=0)


def _token(request_id: str, number: int, last: int) -> tuple[RequestOutput, None]:
    return RequestOutput(request_id, f"<{number}>", [number], finished=number == last,
                         finish_reason="length" if number == last else None,
                         num_output_tokens=number), None


@pytest.fixture
def scripted():
    instances = Scripted()
    frontends: list[ClusterFrontend] = []

    def make(**overrides) -> ClusterFrontend:
        max_queue_size = overrides.pop("max_queue_size", 0)
        frontend = ClusterFrontend(instances, cluster_config(**overrides),
                                   max_queue_size=max_queue_size)
        frontend.start()
        frontends.append(frontend)
        return frontend

    yield instances, make
    instances.closed.set()
    for frontend in frontends:
        frontend.shutdown()


@pytest.mark.parametrize("seed", range(5))
def test_outputs_are_delivered_in_token_order_once(scripted, seed):
    """Around a move both instances report a request's outputs, in any order, some twice:
    it gets each token once, in order, and nothing after its final output."""
    instances, make = scripted
    frontend = make()
    got = Collector()
    request_id = frontend.submit("prompt", GREEDY, got)
    last = 30
    rng = random.Random(seed)
    outputs = [_token(request_id, n, last) for n in range(1, last + 1)]
    outputs += rng.sample(outputs, 10)  # duplicates: the source's and the destination's
    rng.shuffle(outputs)
    for start in range(0, len(outputs), 4):  # reports of a few outputs, either instance
        instances.report(rng.randrange(2), outputs[start:start + 4])
    got.wait_done(10)
    wait_until(lambda: all(q.empty() for q in instances.reports), 5, "every report taken")
    assert got.numbers == list(range(1, last + 1))
    assert got.text == "".join(f"<{n}>" for n in range(1, last + 1))
    assert len(got.finals) == 1 and got.outputs[-1][0].finish_reason == "length"
    assert frontend.num_in_flight == 0
    # A copy arriving after the end is cancelled where it came from (a no-op there).
    assert {request for _, request in instances.aborted} <= {request_id}


def test_an_output_of_an_ended_request_cancels_it_on_its_instance(scripted):
    instances, make = scripted
    frontend = make()
    got = Collector()
    request_id = frontend.submit("prompt", GREEDY, got)
    frontend.cancel(request_id)
    assert instances.aborted == [(0, request_id)]
    instances.report(0, [(RequestOutput(request_id, "", [], finished=True,
                                        finish_reason="abort"), None)])
    assert got.wait_done(5)[0].finish_reason == "abort"
    instances.report(1, [_token(request_id, 1, 10)])  # still running on another instance
    wait_until(lambda: (1, request_id) in instances.aborted, 5, "the stray output's abort")
    assert len(got.outputs) == 1


def test_a_full_queue_refuses_new_requests(scripted):
    instances, make = scripted
    frontend = make(max_queue_size=2)
    first, second = Collector(), Collector()
    first_id = frontend.submit("prompt", GREEDY, first)
    frontend.submit("prompt", GREEDY, second)
    with pytest.raises(QueueFullError):
        frontend.submit("prompt", GREEDY, Collector())
    assert frontend.num_rejected_total == 1 and frontend.num_queued == 2
    assert len(instances.added) == 2  # the refused one went nowhere
    instances.report(0, [_token(first_id, 1, 10)])  # its first token: no longer queued
    first.wait_for(1, 5)
    assert frontend.num_queued == 1
    frontend.submit("prompt", GREEDY, Collector())
    assert len(instances.added) == 3


def test_load_dispatch_prefers_the_freer_instance(scripted):
    instances, make = scripted
    frontend = make(dispatch_policy="load")
    instances.report(0, load=_load(num_used_blocks=28, num_running=4))
    instances.report(1, load=_load())
    wait_until(lambda: len(frontend.stats.freeness) == 2, 5, "both reports")
    for _ in range(4):
        frontend.submit("prompt", GREEDY, Collector())
    assert [instance for instance, _ in instances.added] == [1, 1, 1, 1]


def test_priority_dispatch_with_headroom_and_priority_reaches_the_instance(scripted):
    instances, make = scripted
    sent: list[str] = []
    add_request = instances.add_request
    instances.add_request = lambda instance, request_id, prompt, sampling, **kwargs: (
        sent.append(kwargs["priority"]), add_request(instance, request_id, prompt, sampling))
    frontend = make(dispatch_policy="load", priority_headroom_blocks=20)
    # Instance 0 holds a high-priority request: normal requests see 20 blocks fewer.
    high = InstanceLoad(num_blocks=32, num_used_blocks=4, num_running=1, num_waiting=0,
                        head_of_line_blocks=0, waiting_blocks=0, num_high_running=1)
    instances.report(0, load=high)
    instances.report(1, load=_load(num_used_blocks=8, num_running=2))
    wait_until(lambda: len(frontend.stats.freeness) == 2, 5, "both reports")
    assert frontend.stats.freeness[0] == (32 - 4 - 20) / 1  # the frontend's headroom
    frontend.submit("prompt", GREEDY, Collector())  # (32-4-20)/1 = 8 < (32-8)/2 = 12
    frontend.submit("prompt", GREEDY, Collector(), priority="high")  # 28 > 12
    assert [instance for instance, _ in instances.added] == [1, 0]
    assert sent == ["normal", "high"]
    bad = Collector()
    frontend.submit("prompt", GREEDY, bad, priority="urgent")
    output, error = bad.wait_done(5)
    assert output.finish_reason == "error" and "high" in error and len(sent) == 2


def test_a_poll_failure_fails_the_instance_s_requests(scripted):
    instances, make = scripted
    frontend = make()
    lost, kept = Collector(), Collector()
    frontend.submit("prompt", GREEDY, lost)  # round robin: instance 0
    kept_id = frontend.submit("prompt", GREEDY, kept)
    instances.reports[0].put(InstanceDied("engine instance 0 died: test"))
    output, error = lost.wait_done(5)
    assert output.finish_reason == "error" and "engine instance 0 failed" in error
    assert frontend.stats.num_alive == 1 and not kept.outputs
    frontend.submit("prompt", GREEDY, Collector())
    assert instances.added[-1][0] == 1
    instances.report(1, [_token(kept_id, 1, 1)])
    assert kept.wait_done(5) == (kept.outputs[0][0], None)


def test_a_move_committed_to_an_instance_that_died_meanwhile_fails_the_request(scripted):
    """The destination's death is noticed before the source reports the commit: the
    request's new owner is dead, so it ends with an error instead of waiting forever."""
    instances, make = scripted
    frontend = make()
    got = Collector()
    request_id = frontend.submit("prompt", GREEDY, got)  # instance 0
    instances.report(0, [_token(request_id, 1, 10)])
    got.wait_for(1, 5)
    assert frontend.migrate(request_id, 1)
    instances.reports[1].put(InstanceDied("engine instance 1 died: test"))
    wait_until(lambda: frontend.stats.num_alive == 1, 5, "the death noticed")
    assert not got.done.is_set()  # it was on instance 0: still served there
    report = InstanceReport(0, [], _load(), EngineStats(), migrations=[
        (request_id, MigrationResult(MigrationStatus.COMMITTED, "", 2, 4, 0.01, 4096))])
    instances.reports[0].put(report)
    output, error = got.wait_done(5)
    assert output.finish_reason == "error" and "instance 1" in error
    assert frontend.stats.migrations_ended[("committed", "")] == 1


def test_a_dead_source_s_move_does_not_keep_its_destination_busy():
    """A move whose source died never reports; its destination must still be paired
    with later sources (one move per instance at a time counts live moves only)."""
    instances = Scripted(3)
    frontend = ClusterFrontend(instances, cluster_config(num_instances=3,
                                                         enable_migration=True))
    moves: list[tuple[int, int, str]] = []
    instances.pick_request = lambda instance, policy: next(  # its newest request
        request_id for i, request_id in reversed(instances.added) if i == instance)
    instances.migrate_out = lambda src, dst, request_id, config: moves.append(
        (src, dst, request_id))
    frontend.start()
    try:
        lost = Collector()
        lost_id = frontend.submit("prompt", GREEDY, lost)  # instance 0
        assert frontend.migrate(lost_id, 1)
        instances.reports[0].put(InstanceDied("engine instance 0 died: test"))
        assert lost.wait_done(5)[0].finish_reason == "error"
        frontend.submit("prompt", GREEDY, Collector())  # instance 1
        moved_id = frontend.submit("prompt", GREEDY, Collector())  # instance 2
        assert [i for i, _ in instances.added] == [0, 1, 2]
        # Instance 2 is short of memory (freeness -4), instance 1 is idle.
        instances.report(2, load=InstanceLoad(num_blocks=32, num_used_blocks=32,
                                              num_running=1, num_waiting=1,
                                              head_of_line_blocks=8, waiting_blocks=8))
        instances.report(1, load=_load())
        wait_until(lambda: moves[1:], 5, "instance 2's request moved to instance 1")
        assert moves[1] == (2, 1, moved_id)
    finally:
        instances.closed.set()
        frontend.shutdown()
