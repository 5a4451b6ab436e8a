"""``migration_transport="gloo"``: block data of a move over a pairwise gloo group between
two instance processes (``cluster/gloo_transport.py``), the control calls through Ray.

* a pair of plain Ray actors moves float32 and bfloat16 tensors exactly, reuses its group,
  and makes a new one when the destination lost its own (a restarted peer);
* two instance actors of ``RayCluster`` with the gloo transport: a request moved while it
  streams yields exactly the text of an unmoved run, the move commits, and its bytes went
  over gloo.

``PREEMPTSERVE_BENCH_TRANSPORT=1,4,16,64`` (MiB per stage) also times stages of those
sizes between two instance actors over both transports and prints a table (run with
``-s``); it asserts nothing about the times.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from preemptserve.config import CacheConfig, ClusterConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.engine.outputs import RequestOutput
from preemptserve.model.default_model import ensure_default_model

ray = pytest.importorskip("ray")

RAY_ENV = ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
KV_BYTES = 64 * 2**20
PROMPT = "Once upon a time, in a land far away, there lived"
BENCH_SIZES_MIB = os.environ.get("PREEMPTSERVE_BENCH_TRANSPORT", "")


def engine_config(kv_cache_bytes: int = KV_BYTES) -> EngineConfig:
    return EngineConfig(model_dir=str(ensure_default_model()), device="cpu",
                        scheduler=SchedulerConfig(policy="fcfs"),
                        cache=CacheConfig(kv_cache_bytes=kv_cache_bytes))


@contextmanager
def saved_ray_env() -> Iterator[None]:
    """Ray's variables as they were before (``RayCluster`` and ``private_ray`` set them)."""
    saved = {name: os.environ.get(name) for name in RAY_ENV}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def private_ray() -> Iterator[None]:
    """A private Ray cluster on loopback, with a short temporary directory."""
    temp_dir = tempfile.mkdtemp(prefix="psray", dir="/tmp")  # short socket paths
    with saved_ray_env():
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only
        from ray._private import ray_constants

        enabled, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     _temp_dir=temp_dir, namespace="preemptserve-gloo-test")
            yield
        finally:
            ray.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = enabled
            shutil.rmtree(temp_dir, ignore_errors=True)


# -- a pair of plain actors --------------------------------------------------------------------


def endpoint_class():
    """A plain actor with pairwise groups (defined here: Ray ships it by value)."""
    from preemptserve.cluster.gloo_transport import PairGroups

    class Endpoint:
        def __init__(self, name: str) -> None:
            self.name = name
            self.groups = PairGroups(timeout_s=20.0)

        def has(self, source: str, group_id: str) -> bool:
            return self.groups.has(source, group_id)

        def join(self, source: str, group_id: str, port: int) -> None:
            self.groups.join(source, group_id, port)

        def receive(self, source: str, group_id: str, tag: int, specs) -> list[torch.Tensor]:
            tensors, used_up = self.groups.receive(source, group_id, tag, specs)
            copies = [tensor.clone() for tensor in tensors]
            used_up()
            return copies

        def forget(self) -> None:
            """As a restarted process: no group any more."""
            self.groups.close()
            self.groups = PairGroups(timeout_s=20.0)

        def send(self, destination, name: str, tensors: list[torch.Tensor]):
            """Send ``tensors`` to actor ``destination`` (named ``name``); returns the
            group's id and what it received."""
            def has(group_id: str) -> bool:
                return ray.get(destination.has.remote(self.name, group_id), timeout=20)

            def join(group_id: str, port: int):
                ref = destination.join.remote(self.name, group_id, port)
                return lambda: ray.get(ref, timeout=20)

            group = self.groups.connect(name, has, join)
            tag = group.next_tags(len(tensors))
            specs = [(tuple(t.shape), t.dtype) for t in tensors]
            received = destination.receive.remote(self.name, group.group_id, tag, specs)
            self.groups.send(name, group, tensors, tag)
            return group.group_id, ray.get(received, timeout=20)

        def send_unreceived(self, destination, name: str, tensor: torch.Tensor,
                            timeout_s: float):
            """Send to a destination that never receives: returns how long the send
            took to fail, and the groups left here."""
            group = self.groups.connect(
                name, lambda group_id: ray.get(destination.has.remote(self.name, group_id)),
                lambda group_id, port: (lambda ref: lambda: ray.get(ref, timeout=20))(
                    destination.join.remote(self.name, group_id, port)))
            self.groups.timeout_s, saved = timeout_s, self.groups.timeout_s
            start = time.monotonic()
            try:
                self.groups.send(name, group, [tensor], group.next_tags(1))
            except Exception as exc:
                failed = f"{type(exc).__name__}: {exc}"
            else:
                failed = ""
            finally:
                self.groups.timeout_s = saved
            return time.monotonic() - start, failed, self.groups.describe()["outgoing"]

        def describe(self) -> dict:
            return self.groups.describe()

    return Endpoint


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(torch.int16) if a.dtype is torch.bfloat16 else a,
        b.view(torch.int16) if b.dtype is torch.bfloat16 else b)


def test_a_pair_of_actors_moves_float32_and_bfloat16_exactly():
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(2, 2, 3, 16, 4, 32, generator=generator),  # a block stack's shape
               torch.randn(4, 2, 5, 16, 2, 64, generator=generator).to(torch.bfloat16),
               torch.randn(1 << 20, generator=generator)]  # 4 MiB
    with private_ray():
        assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
        actor = ray.remote(num_cpus=0, max_concurrency=2)(endpoint_class())
        source, destination = actor.remote("a"), actor.remote("b")
        first, received = ray.get(source.send.remote(destination, "b", tensors), timeout=120)
        assert all(same_bits(t, r) for t, r in zip(tensors, received, strict=True))
        again, received = ray.get(source.send.remote(destination, "b", tensors[1:2]),
                                  timeout=60)
        assert again == first, "the pair's group was not reused"
        assert same_bits(tensors[1], received[0])

        ray.get(destination.forget.remote(), timeout=60)  # the destination restarted
        rebuilt, received = ray.get(source.send.remote(destination, "b", tensors),
                                    timeout=120)
        assert rebuilt != first, "the source kept a group its destination no longer has"
        assert all(same_bits(t, r) for t, r in zip(tensors, received, strict=True))
        sent = ray.get(source.describe.remote(), timeout=60)
        assert sent["groups_made"] == 2
        assert sent["outgoing"] == {"b": rebuilt}
        assert sent["bytes_sent"] == sum(2 * t.numel() * t.element_size() for t in tensors) \
            + tensors[1].numel() * tensors[1].element_size()
        assert ray.get(destination.describe.remote(), timeout=60)["incoming"] == {"a": rebuilt}


def test_a_send_nobody_receives_fails_within_its_timeout_and_drops_the_group():
    tensor = torch.arange(1 << 16, dtype=torch.float32)
    with private_ray():
        actor = ray.remote(num_cpus=0, max_concurrency=2)(endpoint_class())
        source, destination = actor.remote("a"), actor.remote("b")
        first, _ = ray.get(source.send.remote(destination, "b", [tensor]), timeout=120)
        elapsed, failed, outgoing = ray.get(
            source.send_unreceived.remote(destination, "b", tensor, 1.0), timeout=60)
        assert failed, "a send that nobody received succeeded"
        assert 0.9 < elapsed < 10, elapsed
        assert outgoing == {}, "the failed group was kept"
        # The next transfer makes a new group (the destination's old one is replaced).
        rebuilt, received = ray.get(source.send.remote(destination, "b", [tensor]),
                                    timeout=120)
        assert rebuilt != first and torch.equal(received[0], tensor)
        assert ray.get(destination.describe.remote(), timeout=60)["incoming"] == {"a": rebuilt}


# -- two instances of RayCluster ---------------------------------------------------------------


GREEDY = SamplingParams(max_tokens=120, min_length=120, temperature=0.0)
# top_k set: with neither top_k nor top_p, temperature 1 would still be greedy.
SEEDED = SamplingParams(max_tokens=120, min_length=120, temperature=1.0, top_k=40, seed=7)


@pytest.fixture(scope="module")
def gloo_cluster():
    from preemptserve.cluster.ray_cluster import RayCluster

    temp_dir = tempfile.mkdtemp(prefix="psray", dir="/tmp")  # short socket paths
    config = ClusterConfig(num_instances=2, ray_temp_dir=temp_dir, migration_transport="gloo",
                           dispatch_policy="round_robin", enable_migration=False,
                           polling_interval_ms=20, migration_last_stage_max_blocks=2)
    with saved_ray_env():
        cluster = None
        try:
            cluster = RayCluster(config, engine_config())
            yield cluster
        finally:
            try:
                if cluster is not None:
                    cluster.shutdown()
            finally:
                shutil.rmtree(temp_dir, ignore_errors=True)


class Collector:
    def __init__(self) -> None:
        self.outputs: list[tuple[RequestOutput, str | None]] = []
        self.done = threading.Event()

    def __call__(self, output: RequestOutput, error: str | None) -> None:
        self.outputs.append((output, error))
        if output.finished:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(output.text for output, _ in self.outputs)


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_moved_over_gloo_gives_the_unmoved_text(gloo_cluster, sampling):
    from preemptserve.cluster.frontend import ClusterFrontend

    engine = LLMEngine(engine_config())
    try:
        expected = engine.generate([PROMPT], sampling)[0]
    finally:
        engine.shutdown()
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
    before = ray.get([h.transport_info.remote() for h in gloo_cluster.handles], timeout=60)
    assert [info["transport"] for info in before] == ["gloo", "gloo"]

    frontend = ClusterFrontend(gloo_cluster, gloo_cluster.config,
                               cancellation_check_period_s=0.01)
    frontend.start()
    try:
        collector = Collector()
        request_id = frontend.submit(PROMPT, sampling, collector)
        # 40 tokens in: 4 blocks of 16, so a pre-copy stage before the last one.
        wait_until(lambda: len(collector.outputs) >= 40, 120, "40 tokens")
        source = next(i for i in range(2) if frontend.migrate(request_id, 1 - i))
        assert collector.done.wait(120), "the request did not finish"
        wait_until(lambda: sum(frontend.stats.migrations_ended.values()) >= 1, 60,
                   "the move's result")
        stats = frontend.stats
    finally:
        frontend.shutdown()

    assert [error for _, error in collector.outputs if error] == []
    assert collector.text == expected
    assert stats.migrations_ended == Counter({("committed", ""): 1})
    after = ray.get([h.transport_info.remote() for h in gloo_cluster.handles], timeout=60)
    sent = after[source].get("bytes_sent", 0) - before[source].get("bytes_sent", 0)
    received = (after[1 - source].get("bytes_received", 0)
                - before[1 - source].get("bytes_received", 0))
    assert sent == received == stats.migration_bytes > 0, "the blocks did not go over gloo"
    assert after[source]["outgoing"] == {str(1 - source): after[1 - source]["incoming"][
        str(source)]}
    usage = ray.get([h.block_usage.remote() for h in gloo_cluster.handles], timeout=60)
    assert [u["device"] for u in usage] == [0, 0], usage


def test_moves_both_ways_at_once_do_not_deadlock(gloo_cluster):
    """Each instance sends one request to the other at the same time: each one's
    ``migrate_out`` holds a ``migration`` thread while the other's data comes in."""
    from preemptserve.cluster.frontend import ClusterFrontend

    prompts = [PROMPT, f"{PROMPT} a castle"]
    engine = LLMEngine(engine_config())
    try:
        expected = [engine.generate([prompt], GREEDY)[0] for prompt in prompts]
    finally:
        engine.shutdown()
    frontend = ClusterFrontend(gloo_cluster, gloo_cluster.config,
                               cancellation_check_period_s=0.01)
    frontend.start()
    try:
        collectors = [Collector(), Collector()]
        # Round robin: one request on each instance.
        request_ids = [frontend.submit(prompt, GREEDY, collector)
                       for prompt, collector in zip(prompts, collectors, strict=True)]
        wait_until(lambda: min(len(c.outputs) for c in collectors) >= 40, 120, "40 tokens")
        owners = [next(i for i in range(2) if frontend.migrate(request_id, 1 - i))
                  for request_id in request_ids]
        assert sorted(owners) == [0, 1], owners
        for collector in collectors:
            assert collector.done.wait(120), "a request did not finish"
        wait_until(lambda: sum(frontend.stats.migrations_ended.values()) >= 2, 60,
                   "the moves' results")
        stats = frontend.stats
    finally:
        frontend.shutdown()
    assert [c.text for c in collectors] == expected
    assert stats.migrations_ended == Counter({("committed", ""): 2})
    usage = ray.get([h.block_usage.remote() for h in gloo_cluster.handles], timeout=60)
    assert [u["device"] for u in usage] == [0, 0], usage


# -- stage times by transport (opt in) ---------------------------------------------------------


def bench_instance_class():
    from preemptserve.cluster.ray_cluster import RayInstance

    class BenchInstance(RayInstance):
        def time_stages(self, destination, destination_id, num_blocks: int,
                        repeats: int) -> list[float]:
            """Seconds per stage of ``num_blocks`` blocks to ``destination`` (by gloo
            with ``destination_id``, else through the object store): the destination
            receives, reserves and writes them; each reservation is released after."""
            data = self._on_engine(lambda e: e.read_blocks(list(range(num_blocks)), False))
            peer = self._peer(destination, 60.0, destination_id)
            times = []
            for i in range(repeats + 1):  # the first one makes the group: not timed
                request_id = f"bench-{destination_id}-{num_blocks}-{i}"
                start = time.perf_counter()
                reason = peer.stage_in(request_id, False, peer.transport(data), num_blocks,
                                       None)
                elapsed = time.perf_counter() - start
                assert not reason, reason
                peer.release_reservation(request_id)
                if i:
                    times.append(elapsed)
            return times

    return BenchInstance


@pytest.mark.skipif(not BENCH_SIZES_MIB, reason="set PREEMPTSERVE_BENCH_TRANSPORT=1,4,16")
def test_stage_time_by_transport():
    from preemptserve.cluster.ray_cluster import _GROUPS
    from preemptserve.engine.kv_cache import bytes_per_block
    from preemptserve.model.args import LlamaArgs

    sizes = [int(size) for size in BENCH_SIZES_MIB.split(",")]
    repeats = 10
    with private_ray():
        actor = ray.remote(num_cpus=1, concurrency_groups=_GROUPS)(bench_instance_class())
        config = engine_config(kv_cache_bytes=(max(sizes) + 16) * 2**20)
        source, destination = (actor.remote(i, config, torch_threads=1,
                                            migration_transport="gloo") for i in range(2))
        info = ray.get(source.info.remote(), timeout=600)
        ray.get(destination.info.remote(), timeout=600)
        block_bytes = bytes_per_block(LlamaArgs.from_model_dir(ensure_default_model()),
                                      config.cache.block_size, torch.float32)
        assert info["num_blocks"] * block_bytes >= max(sizes) * 2**20
        rows = []
        for size in sizes:
            num_blocks = size * 2**20 // block_bytes
            row = [size]
            for destination_id in (None, 1):  # object store, gloo
                times = ray.get(source.time_stages.remote(destination, destination_id,
                                                          num_blocks, repeats), timeout=600)
                row += [statistics.median(times) * 1e3, min(times) * 1e3]
            rows.append(row)
        ray.get([source.shutdown.remote(), destination.shutdown.remote()], timeout=60)
    print(f"\nstage of N MiB between two instance actors, {repeats} stages each "
          f"(nproc {os.cpu_count()}):")
    print("| MiB | object store median ms | min ms | gloo median ms | min ms |")
    print("|---:|---:|---:|---:|---:|")
    for size, store_median, store_min, gloo_median, gloo_min in rows:
        print(f"| {size} | {store_median:.1f} | {store_min:.1f} | {gloo_median:.1f} | "
              f"{gloo_min:.1f} |")
