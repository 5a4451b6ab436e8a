"""Auto-scaling acted on by the cluster frontend (``enable_scaling``).

Scripted instances check the frontend's rules exactly: a started instance takes requests
from its first report on, never more than ``max_instances``, a dead instance below
``min_instances`` is replaced, and a model whose instances all died and cannot be
replaced fails. Engine instances in this process (``LocalInstances``) scale 1 -> 2 -> 1
under load and drain an instance with requests on it: they finish with exactly the
tokens of an unmoved run, no new request goes to the draining instance, it is stopped
once empty with every block free, and counters never go down. Ray actors scale 1 -> 2
-> 1 and the stopped actor's process is gone.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields

import pytest
from cluster_helpers import GREEDY, PROMPT, Collector, engine_config, wait_until
from test_cluster_frontend import IDLE, Scripted, _load, cluster_config

from preemptserve.cluster.frontend import ClusterFrontend, InstanceState
from preemptserve.cluster.instance import EngineInstance
from preemptserve.cluster.local import LocalInstances
from preemptserve.cluster.ray_cluster import InstanceDied
from preemptserve.core.request import SamplingParams
from preemptserve.engine.outputs import EngineStats

ALIVE, STARTING, DRAINING, STOPPED, DEAD = (InstanceState.ALIVE, InstanceState.STARTING,
                                             InstanceState.DRAINING, InstanceState.STOPPED,
                                             InstanceState.DEAD)
COUNTERS = [f.name for f in fields(EngineStats) if f.name.endswith("_total")
            and f.name not in ("num_blocks_total", "num_host_blocks_total")]


def scaling_config(**overrides):
    return cluster_config(**{"enable_scaling": True, "dispatch_policy": "load",
                             "scaling_interval_s": 0.1, **overrides})


def state_of(frontend: ClusterFrontend, instance: int) -> InstanceState | None:
    return frontend.instance_states().get(instance)


def assert_counters_never_decrease(seen: list[EngineStats]) -> None:
    for name in COUNTERS:
        values = [getattr(stats, name) for stats in seen]
        assert values == sorted(values), f"{name} went down: {values}"


# -- the frontend's rules, with scripted instances ------------------------------------------

class Growing(Scripted):
    """Scripted instances that ``start_instance`` adds (their polls wait for the test's
    reports) and ``stop_instance`` stops; ``fail_starts``: starts raise."""

    def __init__(self, num_instances: int) -> None:
        super().__init__(num_instances)
        self.started: list[int] = []
        self.stopped: list[int] = []
        self.fail_starts = False

    def start_instance(self) -> int:
        if self.fail_starts:
            raise RuntimeError("no room for another instance")
        self.reports.append(queue.SimpleQueue())
        self.num_instances = len(self.reports)
        self.started.append(self.num_instances - 1)
        return self.num_instances - 1

    def stop_instance(self, instance: int) -> None:
        self.stopped.append(instance)
        self.reports[instance].put(InstanceDied(f"engine instance {instance} was stopped"))


@pytest.fixture
def growing():
    made: list[tuple[Growing, ClusterFrontend]] = []

    def make(num_instances: int, **overrides) -> tuple[Growing, ClusterFrontend]:
        instances = Growing(num_instances)
        frontend = ClusterFrontend(instances, scaling_config(num_instances=num_instances,
                                                             **overrides))
        frontend.start()
        made.append((instances, frontend))
        return instances, frontend

    yield make
    for instances, frontend in made:
        instances.closed.set()
        frontend.shutdown()


def test_a_started_instance_takes_requests_from_its_first_report_on(growing):
    instances, frontend = growing(1, max_instances=2)
    instances.report(0, load=_load(num_used_blocks=28, num_running=4))  # F = 1 < 10
    wait_until(lambda: state_of(frontend, 1) is STARTING, 5, "instance 1 started")
    assert frontend.stats.num_starting == 1 and frontend.stats.num_alive == 1
    for _ in range(3):
        frontend.submit("prompt", GREEDY, Collector())
    assert [i for i, _ in instances.added] == [0, 0, 0]  # not to the starting instance
    instances.report(1, load=_load())
    wait_until(lambda: state_of(frontend, 1) is ALIVE, 5, "instance 1's first report")
    frontend.submit("prompt", GREEDY, Collector())
    assert instances.added[-1][0] == 1
    assert (frontend.stats.num_alive, frontend.stats.num_starting) == (2, 0)
    # The cluster stays short of memory (F = 36 / 5 < 10), but max_instances is 2.
    instances.report(0, load=_load(num_used_blocks=30, num_running=4))
    time.sleep(0.5)
    assert instances.started == [1]
    assert frontend.stats.scaling_events == Counter({"add": 1})


def test_no_instance_is_added_before_the_first_reports(growing):
    instances, frontend = growing(2, min_instances=2, max_instances=4)
    time.sleep(0.4)  # rounds without any report: the two instances count, nothing to do
    assert instances.started == [] and frontend.stats.scaling_events == Counter()


def test_a_dead_instance_below_min_is_replaced_and_the_model_fails_if_none_can_start(growing):
    instances, frontend = growing(2, min_instances=2, max_instances=2)
    instances.report(0, load=_load())
    instances.report(1, load=_load())
    instances.reports[1].put(InstanceDied("engine instance 1 died: test"))
    wait_until(lambda: instances.started == [2], 5, "a replacement started")
    assert state_of(frontend, 1) is DEAD and state_of(frontend, 2) is STARTING
    instances.report(2, load=_load())
    wait_until(lambda: state_of(frontend, 2) is ALIVE, 5, "the replacement's first report")
    assert frontend.failure is None and frontend.stats.num_alive == 2
    # Everything dies, and no instance can start: the model fails (not before: a
    # replacement could have started).
    instances.fail_starts = True
    instances.reports[0].put(InstanceDied("engine instance 0 died: test"))
    instances.reports[2].put(InstanceDied("engine instance 2 died: test"))
    wait_until(lambda: frontend.failure is not None, 5, "the model to fail")
    assert "could not start" in frontend.failure
    assert frontend.stats.scaling_events["add_failed"] >= 1
    assert frontend.stats.scaling_events["add"] == 1 + frontend.stats.scaling_events[
        "add_failed"]


def test_an_idle_instance_is_drained_and_stopped_but_never_below_min(growing):
    instances, frontend = growing(3, min_instances=2, max_instances=3)
    for i in range(3):
        instances.report(i, load=_load())
    # Idle: F = inf. One instance (the highest id among the emptiest) goes, then no more.
    wait_until(lambda: instances.stopped == [2], 5, "instance 2 stopped")
    wait_until(lambda: state_of(frontend, 2) is STOPPED, 5, "instance 2 stopped")
    time.sleep(0.4)
    assert instances.stopped == [2]
    assert frontend.stats.scaling_events == Counter({"drain": 1, "stop": 1})
    assert (frontend.stats.num_alive, frontend.stats.num_draining,
            frontend.stats.num_instances) == (2, 0, 2)
    frontend.submit("prompt", GREEDY, Collector())
    frontend.submit("prompt", GREEDY, Collector())
    assert sorted(i for i, _ in instances.added) == [0, 1]


# -- engine instances in this process -------------------------------------------------------

class Watched(LocalInstances):
    """``LocalInstances`` that start more with a factory, remember where each request
    went, and each stopped instance's block usage just before it stopped."""

    def __init__(self, model_dir, num_instances: int) -> None:
        def build(instance: int) -> EngineInstance:
            return EngineInstance(instance, engine_config(model_dir), torch_threads=1,
                                  reservation_timeout_s=10.0, stats_period_s=0.02)

        super().__init__([build(i) for i in range(num_instances)], factory=build)
        self.sent_to: list[int] = []
        self.usage_at_stop: dict[int, dict[str, int]] = {}
        self.stopped_at: dict[int, float] = {}

    def add_request(self, instance, request_id, prompt, sampling, **kwargs) -> None:
        self.sent_to.append(instance)
        super().add_request(instance, request_id, prompt, sampling, **kwargs)

    def stop_instance(self, instance: int, timeout_s: float = 10.0) -> None:
        self.usage_at_stop[instance] = self._alive(instance).block_usage()
        super().stop_instance(instance, timeout_s)
        self.stopped_at[instance] = time.monotonic()


@contextmanager
def paused(instance: EngineInstance) -> Iterator[None]:
    """The instance's engine thread waits (no step, no admission) inside the block."""
    entered, release = threading.Event(), threading.Event()

    def hold(engine) -> None:
        entered.set()
        release.wait(60)

    instance.loop.call(hold)
    assert entered.wait(10)
    try:
        yield
    finally:
        release.set()


class Published:
    """``on_stats``: every summed statistics published, with when."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, EngineStats]] = []

    def __call__(self, stats: EngineStats) -> None:
        self.seen.append((time.monotonic(), stats))

    @property
    def stats(self) -> list[EngineStats]:
        return [stats for _, stats in self.seen]


@pytest.fixture
def watched(default_model_dir):
    made: list[Watched] = []

    def make(num_instances: int) -> Watched:
        made.append(Watched(default_model_dir, num_instances))
        return made[-1]

    yield make
    for local in made:
        local.shutdown()


def test_scale_up_under_load_then_back_down(watched, reference):
    """1 -> 2 under load (the new instance takes the next requests), 2 -> 1 once idle;
    texts exact, never more than max_instances, the stopped instance's tokens stay
    counted and its blocks all free."""
    local = watched(1)
    published = Published()
    frontend = ClusterFrontend(local, scaling_config(num_instances=1, max_instances=2,
                                                     scaling_interval_s=0.3),
                               cancellation_check_period_s=0.01, on_stats=published)
    frontend.start()
    try:
        expected = reference(PROMPT, GREEDY)
        first = [Collector() for _ in range(4)]
        for got in first:
            frontend.submit(PROMPT, GREEDY, got)
        for got in first:
            got.wait_for(1)  # 4 running, 3 blocks each: F = (48 - 12) / 4 = 9 < 10
        with paused(local.instances[0]):  # the load holds while instance 1 starts
            wait_until(lambda: state_of(frontend, 1) is ALIVE, 60, "instance 1 serving")
            second = [Collector() for _ in range(2)]
            for got in second:
                frontend.submit(PROMPT, GREEDY, got)
            assert local.sent_to == [0, 0, 0, 0, 1, 1]
        for got in first + second:
            assert got.wait_done()[1] is None
            assert got.text == expected
        # Idle: instance 1 (the emptiest, the highest id on ties) is drained and stopped.
        wait_until(lambda: state_of(frontend, 1) is STOPPED, 30, "instance 1 stopped")
        assert local.usage_at_stop[1] == IDLE
        assert state_of(frontend, 0) is ALIVE and len(local.instances) == 2
        assert frontend.stats.scaling_events == Counter({"add": 1, "drain": 1, "stop": 1})
        wait_until(lambda: published.seen[-1][0] > local.stopped_at[1], 10,
                   "statistics published after the stop")
        last = published.stats[-1]
        assert last.num_generated_tokens_total == 6 * GREEDY.max_tokens  # instance 1's stay
        assert last.num_blocks_total == local.instances[0].info()["num_blocks"]  # gauges drop
        assert_counters_never_decrease(published.stats)
        wait_until(lambda: local.instances[0].block_usage() == IDLE, 10, "instance 0 idle")
    finally:
        frontend.shutdown()


def test_draining_moves_requests_out_with_their_exact_tokens(watched, reference):
    """Instance 1 is drained while a request sent to it is still in its inbox (its
    report says empty; the frontend knows better): the request moves to instance 0
    (holding no cache, or after it started there) and ends with exactly its unmoved
    tokens; requests arriving meanwhile go to instance 0; instance 1 stops once empty,
    every block free; instance 0 is never drained (min_instances 1)."""
    local = watched(2)
    published = Published()
    # Never up; down as soon as F without an instance is finite or more (any load here).
    config = scaling_config(num_instances=2, dispatch_policy="round_robin", max_instances=2,
                            scale_up_threshold=-1e9, scale_down_threshold=-1e8,
                            scaling_interval_s=0.2)
    frontend = ClusterFrontend(local, config, cancellation_check_period_s=0.01,
                               on_stats=published)
    long = SamplingParams(max_tokens=120, min_length=120, temperature=0.0)
    kept, moved = Collector(), Collector()
    with paused(local.instances[1]):
        frontend.submit(PROMPT, long, kept)  # round robin: instance 0
        frontend.submit(PROMPT, long, moved)  # instance 1, waiting in its inbox
        frontend.start()
        try:
            # Instance 1 reports nothing held (its engine has not seen the request): the
            # emptiest, it is drained; the frontend knows it still holds one.
            wait_until(lambda: state_of(frontend, 1) is DRAINING, 10, "instance 1 draining")
        except BaseException:
            frontend.shutdown()
            raise
    try:
        arrivals = [Collector() for _ in range(2)]
        for got in arrivals:
            frontend.submit(PROMPT, GREEDY, got)
        assert local.sent_to == [0, 1, 0, 0]
        expected = reference(PROMPT, long)
        for got in (kept, moved):
            assert got.wait_done()[1] is None
            assert got.text == expected
        assert moved.numbers == list(range(1, long.max_tokens + 1))
        for got in arrivals:
            assert got.wait_done()[1] is None
            assert got.text == reference(PROMPT, GREEDY)
        wait_until(lambda: state_of(frontend, 1) is STOPPED, 30, "instance 1 stopped")
        assert local.usage_at_stop[1] == IDLE
        # One request moved (picked waiting, FCWSR; its first stage may find it started).
        assert frontend.stats.migrations_ended[("committed", "")] == 1
        assert frontend.stats.scaling_events == Counter({"drain": 1, "stop": 1})
        time.sleep(0.5)  # rounds with one idle instance left: min_instances holds it
        assert state_of(frontend, 0) is ALIVE and frontend.stats.num_alive == 1
        assert frontend.stats.scaling_events["drain"] == 1
        wait_until(lambda: published.seen[-1][0] > local.stopped_at[1], 10,
                   "statistics published after the stop")
        assert published.stats[-1].num_generated_tokens_total == (
            2 * long.max_tokens + 2 * GREEDY.max_tokens)
        assert_counters_never_decrease(published.stats)
        wait_until(lambda: local.instances[0].block_usage() == IDLE, 10, "instance 0 idle")
    finally:
        frontend.shutdown()


# -- Ray actors -----------------------------------------------------------------------------

RAY_ENV = ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


@pytest.mark.slow
def test_ray_actors_scale_1_2_1_and_the_stopped_actor_is_gone(default_model_dir, reference):
    pytest.importorskip("ray")
    from preemptserve.cluster.ray_cluster import RayCluster
    from preemptserve.processes import descendants, is_alive, mentioning, wait_gone

    saved = {name: os.environ.get(name) for name in RAY_ENV}
    temp_dir = tempfile.mkdtemp(prefix="psray", dir="/tmp")  # short socket paths
    before = descendants(os.getpid())
    # Up while any request is in (F < 1e6), down once idle (F = inf); 1 s of hysteresis.
    config = scaling_config(num_instances=1, max_instances=2, scale_up_threshold=1e6,
                            scale_down_threshold=2e6, scaling_interval_s=1.0,
                            enable_migration=True, ray_temp_dir=temp_dir)
    ray_cluster = frontend = None
    try:
        ray_cluster = RayCluster(config, engine_config(default_model_dir))
        frontend = ClusterFrontend(ray_cluster, config, cancellation_check_period_s=0.01)
        frontend.start()
        first = Collector()
        frontend.submit(PROMPT, SamplingParams(max_tokens=300, min_length=300,
                                               temperature=0.0), first)
        wait_until(lambda: state_of(frontend, 1) is ALIVE, 120, "instance 1 serving")
        pid = ray_cluster.infos[1]["pid"]
        assert is_alive(pid) and pid != ray_cluster.infos[0]["pid"]
        burst = [Collector() for _ in range(2)]
        for got in burst:
            frontend.submit(PROMPT, GREEDY, got)
        for got in [first, *burst]:
            assert got.wait_done(120)[1] is None
        for got in burst:
            assert got.text == reference(PROMPT, GREEDY)
        wait_until(lambda: state_of(frontend, 1) is STOPPED, 60, "instance 1 stopped")
        assert wait_gone({pid}, 30) == set(), "the stopped actor's process still runs"
        assert frontend.stats.scaling_events["add"] == 1
        assert frontend.stats.scaling_events["stop"] == 1
        assert frontend.stats.num_alive == 1
        after = Collector()
        frontend.submit(PROMPT, GREEDY, after)
        assert after.wait_done(60)[1] is None and after.text == reference(PROMPT, GREEDY)
    finally:
        session = (descendants(os.getpid()) - before) | mentioning(temp_dir)
        if frontend is not None:
            frontend.shutdown()
        if ray_cluster is not None:
            ray_cluster.shutdown()
        left = wait_gone(session, 30)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert left == set(), f"Ray processes left behind: {sorted(left)}"
