"""Where the instances' Ray runs: a private cluster (``ray_address`` empty) listens on
loopback only, and a model joining a running cluster (``ray start --head`` on loopback, in
token mode) serves through it and leaves it running when it shuts down.

Each test starts as a fresh model process would: Ray not pinned to loopback
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` unset and Ray's constant at its Linux default), so
``RayCluster`` must pin it, and must make Ray read the ``RAY_AUTH_MODE`` it sets."""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cluster_helpers import GREEDY, PROMPT, Collector, engine_config

from preemptserve.cluster.frontend import ClusterFrontend
from preemptserve.config import ClusterConfig
from preemptserve.processes import descendants, is_alive, mentioning, wait_gone

pytest.importorskip("ray")

pytestmark = pytest.mark.slow

SAVED_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
RAY_BIN = Path(sys.executable).with_name("ray")


@pytest.fixture
def fresh_ray_state():
    """Ray as a new process on Linux sees it (not pinned to loopback, no token in the
    environment); everything restored afterwards, Ray's authentication settings included."""
    import ray
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    assert not ray.is_initialized(), "a Ray driver is still connected from an earlier test"
    saved = {name: os.environ.get(name) for name in SAVED_ENV}
    enabled = ray_constants.ENABLE_RAY_CLUSTER
    for name in SAVED_ENV:
        os.environ.pop(name, None)
    ray_constants.ENABLE_RAY_CLUSTER = True
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        ray_constants.ENABLE_RAY_CLUSTER = enabled
        # The configuration first, then the token cache (the order Ray's own tests use).
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


# -- listening sockets, from /proc ----------------------------------------------------------


def _address(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:1F90`` (/proc/net/tcp{,6}: 32-bit words in host order) as (ip, port)."""
    ip_hex, port_hex = field.split(":")
    raw = bytes.fromhex(ip_hex)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port_hex, 16)


def listening_sockets() -> dict[int, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """Socket inode -> (ip, port) of every listening TCP socket (state 0A)."""
    found = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                found[int(fields[9])] = _address(fields[1])
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open."""
    found = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(int(link[len("socket:["):-1]))
    return found


def on_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """127.x, ::1 and ::ffff:127.x; not 0.0.0.0, :: or an interface's address."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return "?"


def kill_left(pids: set[int], timeout_s: float) -> set[int]:
    """Wait up to ``timeout_s`` for ``pids`` (processes this test started) to exit, SIGKILL
    those still there; return those (to report them)."""
    left = wait_gone(pids, timeout_s)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    wait_gone(left, 5)
    return left


# -- the tests --------------------------------------------------------------------------------


def test_a_private_cluster_listens_on_loopback_only(default_model_dir, fresh_ray_state):
    import ray

    from preemptserve.cluster.ray_cluster import RayCluster

    temp_dir = tempfile.mkdtemp(prefix="psdep", dir="/tmp")  # short socket paths
    me = os.getpid()
    before = descendants(me)
    mine_before = socket_inodes(me)  # this process's own listeners from earlier tests
    cluster = None
    session: set[int] = set()
    try:
        cluster = RayCluster(ClusterConfig(num_instances=2, ray_temp_dir=temp_dir),
                             engine_config(default_model_dir))
        # Ray's agents start beside the raylet, asynchronously: look a few times.
        listeners: dict[tuple[int, str, int], str] = {}
        for _ in range(4):
            session = (descendants(me) - before) | mentioning(temp_dir)
            sockets = listening_sockets()
            for pid in session | {me}:
                for inode in socket_inodes(pid) & sockets.keys() - mine_before:
                    ip, port = sockets[inode]
                    listeners[pid, str(ip), port] = command(pid)
            time.sleep(0.3)
        pids = {pid for pid, _, _ in listeners}
        instances = {info["pid"] for info in cluster.infos}
        # Not vacuous: the driver, GCS, raylet and both instances do listen.
        assert instances <= pids and me in pids, listeners
        assert any("gcs_server" in cmd for cmd in listeners.values()), listeners
        assert any("raylet" in cmd for cmd in listeners.values()), listeners
        outside = {key: cmd for key, cmd in listeners.items()
                   if not on_loopback(ipaddress.ip_address(key[1]))}
        assert outside == {}, f"listening beyond loopback: {outside}"
    finally:
        try:
            session |= (descendants(me) - before) | mentioning(temp_dir)
            if cluster is not None:
                cluster.shutdown()
            elif ray.is_initialized():
                ray.shutdown()
            left = kill_left(session - {me}, 30)
            assert left == set(), f"Ray processes left behind: {sorted(left)}"
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_head(temp_dir: str, token: str) -> tuple[subprocess.Popen, int, Path]:
    """``ray start --head --block`` on loopback in token mode, as this process's child;
    returns it when it accepts drivers, with its GCS port and its log."""
    port = _free_port()
    log = Path(temp_dir) / "head.log"
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        head = subprocess.Popen(
            [str(RAY_BIN), "start", "--head", "--block", f"--port={port}",
             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
             f"--ray-client-server-port={_free_port()}",  # else 10001 for every head
             "--disable-usage-stats", f"--temp-dir={temp_dir}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while "Ray runtime started" not in log.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            _stop_head(head, set())
            pytest.fail(f"ray start --head did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return head, port, log


def _stop_head(head: subprocess.Popen, started: set[int]) -> set[int]:
    """SIGTERM to the head (SIGKILL after 45 s: its GCS may take 30-40 s), then wait for
    its descendants to exit; those still there after 15 s are killed, and returned."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(45)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(10)
    return kill_left(started, 15)


def test_a_model_joins_a_running_cluster_and_leaves_it_running(default_model_dir, reference,
                                                                fresh_ray_state):
    import ray

    from preemptserve.cluster.ray_cluster import RayCluster

    temp_dir = tempfile.mkdtemp(prefix="psdeh", dir="/tmp")
    token = secrets.token_hex(32)
    head, port, log = _start_head(temp_dir, token)
    head_processes = descendants(head.pid) | mentioning(temp_dir)
    daemons = {pid for pid in head_processes
               if any(name in command(pid) for name in ("gcs_server", "raylet/raylet"))}
    cluster = frontend = None
    instances: set[int] = set()
    try:
        assert len(daemons) == 2, {pid: command(pid) for pid in head_processes}
        address = f"127.0.0.1:{port}"
        os.environ["RAY_AUTH_TOKEN"] = token  # the driver's token; its mode: the config's
        config = ClusterConfig(num_instances=2, ray_address=address, ray_auth_mode="token",
                               dispatch_policy="round_robin", enable_migration=False,
                               polling_interval_ms=20)
        cluster = RayCluster(config, engine_config(default_model_dir))
        instances = {info["pid"] for info in cluster.infos}
        assert len(instances) == 2 and instances <= descendants(head.pid), \
            "the instances should run under the external head's raylet"
        frontend = ClusterFrontend(cluster, config, cancellation_check_period_s=0.01)
        frontend.start()
        got = Collector()
        frontend.submit(PROMPT, GREEDY, got)
        output, error = got.wait_done()
        assert (output.finish_reason, error) == ("length", None)
        assert got.text == reference(PROMPT, GREEDY)
        assert got.numbers == list(range(1, GREEDY.max_tokens + 1))

        frontend.shutdown()
        frontend = None
        cluster.shutdown()
        cluster = None
        assert not ray.is_initialized(), "the driver should have disconnected"
        assert wait_gone(instances, 15) == set(), "instance actor processes still alive"
        # The external cluster is untouched, and still takes drivers.
        assert head.poll() is None and all(map(is_alive, daemons)), \
            f"shutting the model down stopped the cluster it joined:\n{log.read_text()[-2000:]}"
        ray.init(address=address, log_to_driver=False)
        try:
            assert [node["Alive"] for node in ray.nodes()] == [True]
        finally:
            ray.shutdown()
    finally:
        try:
            if frontend is not None:
                frontend.shutdown()
            if cluster is not None:
                cluster.shutdown()
            elif ray.is_initialized():
                ray.shutdown()
            everything = descendants(head.pid) | mentioning(temp_dir) | head_processes
            # Its DashboardAgent and RuntimeEnvAgent may outlive it by a minute: killed.
            _stop_head(head, everything | instances)
            assert head.returncode is not None
            left = {pid for pid in everything | instances if is_alive(pid)}
            assert left == set(), f"processes of the head left behind: {sorted(left)}"
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
