"""Tests of the Triton launcher: fast ones without a server, then a few that start one.

The server tests use their own tiny repositories (empty, one trivial Python model, one
broken model), so they check the launcher whatever state the project's model is in.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
import textwrap
import urllib.request
from pathlib import Path

import pytest

from preemptserve import triton_server
from preemptserve.triton_server import TritonPaths, TritonServer, TritonServerError


@pytest.fixture
def fake_paths(tmp_path: Path) -> TritonPaths:
    server_dir = tmp_path / "pytriton" / "tritonserver"
    paths = TritonPaths(
        server_bin=server_dir / "bin" / "tritonserver",
        backends_dir=server_dir / "backends",
        libs_dir=tmp_path / "nvidia_pytriton.libs",
        stubs_dir=server_dir / "python_backend_stubs",
    )
    (paths.backends_dir / "python").mkdir(parents=True)
    for version in ("3.10", "3.11"):
        stub = paths.stub_for(version)
        stub.parent.mkdir(parents=True)
        stub.write_bytes(f"stub {version}".encode())
    return paths


def test_find_free_ports_are_distinct_and_bindable() -> None:
    ports = triton_server.find_free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_unset_ports_are_picked_and_set_ones_kept(tmp_path: Path) -> None:
    server = TritonServer(tmp_path, http_port=18000)
    assert server.http_port == 18000
    assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
    assert server.http_url == "http://127.0.0.1:18000"
    assert server.grpc_url == f"127.0.0.1:{server.grpc_port}"
    assert server.metrics_url == f"http://127.0.0.1:{server.metrics_port}/metrics"


def test_wildcard_host_gives_loopback_urls(tmp_path: Path) -> None:
    server = TritonServer(tmp_path, 1, 2, 3, host="0.0.0.0")
    assert server.grpc_url == "127.0.0.1:2"
    assert "--grpc-address=0.0.0.0" in server.command(triton_server.find_triton())


def test_command_binds_the_given_host_and_ports(tmp_path: Path, fake_paths: TritonPaths) -> None:
    server = TritonServer(tmp_path, 1001, 1002, 1003, extra_args=["--log-verbose=1"])
    cmd = server.command(fake_paths)
    assert cmd[0] == str(fake_paths.server_bin)
    for arg in (
        f"--model-repository={tmp_path.resolve()}",
        f"--backend-directory={fake_paths.backends_dir}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--http-port=1001",
        "--grpc-port=1002",
        "--metrics-port=1003",
        "--allow-metrics=true",
    ):
        assert arg in cmd
    assert cmd[-1] == "--log-verbose=1"


def test_build_env_puts_libraries_and_python_first(fake_paths: TritonPaths) -> None:
    base = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/opt/lib", "HOME": "/root"}
    env = triton_server.build_env(fake_paths, base, python_prefix="/venv")
    assert env["PATH"].split(os.pathsep) == ["/venv/bin", "/usr/bin", "/bin"]
    lib_dirs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert lib_dirs[0] == str(fake_paths.libs_dir)
    assert str(sysconfig.get_config_var("LIBDIR")) in lib_dirs
    assert lib_dirs[-1] == "/opt/lib"
    assert env["HOME"] == "/root"
    assert base["PATH"] == "/usr/bin:/bin"  # the caller's mapping is not changed


def test_build_env_does_not_repeat_entries(fake_paths: TritonPaths) -> None:
    once = triton_server.build_env(fake_paths, {"PATH": "/bin"}, python_prefix="/venv")
    twice = triton_server.build_env(fake_paths, once, python_prefix="/venv")
    assert twice["PATH"] == once["PATH"]
    assert twice["LD_LIBRARY_PATH"] == once["LD_LIBRARY_PATH"]


def test_prepare_python_backend_copies_the_matching_stub(fake_paths: TritonPaths) -> None:
    installed = triton_server.prepare_python_backend(fake_paths, "3.11")
    assert installed == fake_paths.installed_stub
    assert installed.read_bytes() == b"stub 3.11"
    assert os.access(installed, os.X_OK)
    triton_server.prepare_python_backend(fake_paths, "3.10")  # another version replaces it
    assert installed.read_bytes() == b"stub 3.10"


def test_prepare_python_backend_names_available_versions(fake_paths: TritonPaths) -> None:
    with pytest.raises(TritonServerError, match=r"Python 3\.99 .*available: 3\.10, 3\.11"):
        triton_server.prepare_python_backend(fake_paths, "3.99")


def test_find_triton_locates_the_installed_wheel() -> None:
    paths = triton_server.find_triton()
    assert os.access(paths.server_bin, os.X_OK)
    assert paths.stub_for(triton_server.current_python_version()).is_file()


def test_missing_repository_is_reported_before_starting(tmp_path: Path) -> None:
    with pytest.raises(TritonServerError, match="does not exist"):
        TritonServer(tmp_path / "absent").start()


# With a real server ----------------------------------------------------------------------

_IDENTITY_CONFIG = """
name: "identity"
backend: "python"
max_batch_size: 0
input [{ name: "x" data_type: TYPE_INT32 dims: [ -1 ] }]
output [{ name: "y" data_type: TYPE_INT32 dims: [ -1 ] }]
instance_group [{ count: 1 kind: KIND_CPU }]
"""

_IDENTITY_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())]
            )
            for r in requests
        ]
"""


def _write_model(repository: Path, name: str, config: str, model_py: str) -> None:
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(textwrap.dedent(config))
    (version_dir / "model.py").write_text(textwrap.dedent(model_py))


def _process_group_members(pgid: int) -> list[str]:
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "-g", str(pgid)], capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.e2e
def test_server_starts_serves_and_stops_with_its_stubs(tmp_path: Path) -> None:
    _write_model(tmp_path / "repo", "identity", _IDENTITY_CONFIG, _IDENTITY_MODEL)
    with TritonServer(tmp_path / "repo", ready_timeout_s=120) as server:
        pgid = server.pid
        assert pgid is not None
        assert any("triton_python_backend_stub" in m for m in _process_group_members(pgid))

        import numpy as np
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(server.grpc_url)
        x = grpcclient.InferInput("x", [3], "INT32")
        x.set_data_from_numpy(np.array([1, 2, 3], dtype=np.int32))
        y = client.infer("identity", [x]).as_numpy("y")
        client.close()
        assert y is not None and y.tolist() == [1, 2, 3]

        with urllib.request.urlopen(server.metrics_url, timeout=5) as resp:
            assert b"nv_inference_request_success" in resp.read()
        log_path = server.log_path
        assert log_path is not None and log_path.exists()
    assert not server.is_running()
    assert _process_group_members(pgid) == []
    assert not log_path.exists()  # the temporary log goes with the server


@pytest.mark.e2e
def test_broken_model_fails_fast_with_the_log_tail(tmp_path: Path) -> None:
    _write_model(tmp_path / "repo", "identity", _IDENTITY_CONFIG, "raise RuntimeError('boom')\n")
    server = TritonServer(tmp_path / "repo", log_file=tmp_path / "server.log")
    with pytest.raises(TritonServerError, match=r"(?s)exited with code .*boom"):
        with server:
            pass
    assert not server.is_running()
    assert (tmp_path / "server.log").exists()  # a log file given by the caller is kept


@pytest.mark.e2e
def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    http_port, grpc_port, metrics_port = triton_server.find_free_ports(3)
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "preemptserve.launcher",
            f"--model-repository={tmp_path / 'repo'}",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout is not None
        banner = ""
        for line in cli.stdout:
            banner += line
            if "Ctrl-C" in line:
                break
        assert f"127.0.0.1:{grpc_port}" in banner
        assert f"http://127.0.0.1:{http_port}/v2/models/llm/generate_stream" in banner
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready") as resp:
            assert resp.status == 200
        cli.terminate()
        assert cli.wait(timeout=60) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=2)
