"""The frontend over engine instances as Ray actors (``RayCluster``: a private cluster on
loopback, two instances of one CPU each): a request moved mid-stream gives exactly the
unmoved text, a killed instance process fails only its request, and shutting down
leaves no process of the Ray session behind."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile

import pytest
from cluster_helpers import GREEDY, PROMPT, SEEDED, Collector, engine_config, wait_until

from preemptserve.cluster.frontend import ClusterFrontend
from preemptserve.config import ClusterConfig
from preemptserve.core.request import SamplingParams
from preemptserve.processes import descendants, is_alive, mentioning, wait_gone

pytest.importorskip("ray")

pytestmark = pytest.mark.slow

RAY_ENV = ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


class Cluster:
    """A private Ray cluster of two instances; ``stop()`` ends it and returns the
    processes of its session still alive after 30 s (none, if shutdown works)."""

    def __init__(self, model_dir) -> None:
        from preemptserve.cluster.ray_cluster import RayCluster

        self.temp_dir = tempfile.mkdtemp(prefix="psray", dir="/tmp")  # short socket paths
        self.before = descendants(os.getpid())
        self.config = ClusterConfig(num_instances=2, ray_temp_dir=self.temp_dir,
                                    dispatch_policy="round_robin", enable_migration=False,
                                    polling_interval_ms=20, migration_last_stage_max_blocks=2)
        self.ray = RayCluster(self.config, engine_config(model_dir))
        self.frontends: list[ClusterFrontend] = []

    def frontend(self) -> ClusterFrontend:
        """A new frontend over the instances (round robin: its first request goes to
        instance 0)."""
        frontend = ClusterFrontend(self.ray, self.config, cancellation_check_period_s=0.01)
        frontend.start()
        self.frontends.append(frontend)
        return frontend

    def stop(self) -> set[int]:
        session = (descendants(os.getpid()) - self.before) | mentioning(self.temp_dir)
        for frontend in self.frontends:
            frontend.shutdown()
        self.ray.shutdown()
        return wait_gone(session, 30)


@pytest.fixture(scope="module")
def cluster(default_model_dir):
    saved = {name: os.environ.get(name) for name in RAY_ENV}
    started = None
    try:
        started = Cluster(default_model_dir)
        yield started
    finally:
        try:
            if started is not None:
                left = started.stop()
                assert left == set(), f"Ray processes left behind: {sorted(left)}"
        finally:
            if started is not None:
                shutil.rmtree(started.temp_dir, ignore_errors=True)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture
def frontend(cluster):
    frontend = cluster.frontend()
    yield frontend
    frontend.shutdown()


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_moved_between_actors_gives_the_unmoved_text(cluster, frontend, reference,
                                                               sampling):
    expected = reference(PROMPT, sampling)
    got = Collector()
    request_id = frontend.submit(PROMPT, sampling, got)  # instance 0
    got.wait_for(5)
    assert frontend.migrate(request_id, 1)
    output, error = got.wait_done()
    assert (output.finish_reason, error) == ("length", None)
    assert got.text == expected
    assert got.numbers == list(range(1, sampling.max_tokens + 1))
    wait_until(lambda: sum(frontend.stats.migrations_ended.values()) == 1, 10, "the report")
    assert frontend.stats.migrations_ended[("committed", "")] == 1
    assert frontend.stats.migration_bytes > 0


def test_a_killed_instance_process_fails_its_request_the_other_serves(cluster, frontend,
                                                                      reference):
    pids = [info["pid"] for info in cluster.ray.infos]
    assert len(set(pids)) == 2 and os.getpid() not in pids and all(map(is_alive, pids))
    doomed = Collector()
    frontend.submit(PROMPT, SamplingParams(max_tokens=300, min_length=300, temperature=0.0),
                    doomed)  # instance 0
    doomed.wait_for(3)
    os.kill(pids[0], signal.SIGKILL)
    output, error = doomed.wait_done(60)
    assert output.finish_reason == "error" and "instance 0" in (error or "")
    assert len(doomed.finals) == 1
    wait_until(lambda: frontend.stats.num_alive == 1, 30, "the death noticed")
    got = Collector()
    frontend.submit(PROMPT, GREEDY, got)
    assert got.wait_done()[1] is None
    assert got.text == reference(PROMPT, GREEDY)
    assert frontend.failure is None and frontend.stats.num_alive == 1


def test_shutdown_leaves_no_process_of_the_ray_session(cluster):
    """(Last: it ends the module's cluster; the fixture's own stop finds nothing left.)"""
    session = (descendants(os.getpid()) - cluster.before) | mentioning(cluster.temp_dir)
    assert len(session) >= 3, f"expected Ray's daemons and workers, found {sorted(session)}"
    assert cluster.stop() == set()
    assert {p for p in descendants(os.getpid()) - cluster.before if is_alive(p)} == set()
