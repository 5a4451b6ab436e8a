"""Start and stop a Triton Inference Server taken from the ``nvidia-pytriton`` wheel.

``triton_paths`` finds the server and prepares its environment; this module runs it on
loopback ports, waits until it is ready and stops it with every child process. Stdlib
only (no torch, no tritonclient) so that tests and the CLI start fast.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from .triton_paths import (
    TritonPaths,
    TritonServerError,
    build_env,
    current_python_version,
    find_triton,
    prepare_python_backend,
)

__all__ = [
    "DEFAULT_MODEL_REPOSITORY",
    "TritonPaths",
    "TritonServer",
    "TritonServerError",
    "build_env",
    "current_python_version",
    "find_free_ports",
    "find_triton",
    "prepare_python_backend",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
LOG_TAIL_LINES = 40
_TRITON_ERROR_LINE = re.compile(r"^E\d{4} ")  # glog format: E1121 19:49:36.741108 ...
# Logged by every start on a machine without a GPU; not the cause of anything.
_HARMLESS_ERRORS = ("CudaDriverHelper has not been initialized",)


def find_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free on ``host`` a moment ago.

    All sockets stay open until every port is picked, so the ports differ. Another process
    may still take one before the server binds it; the server then exits with an error.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _client_host(host: str) -> str:
    """The address a local client uses to reach a server bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


class TritonServer:
    """A ``tritonserver`` process serving ``model_repository`` on loopback.

    Use it as a context manager: entering starts the server and waits until it is ready,
    leaving always stops it. Ports left as ``None`` are picked free on ``host``. The server
    and the Python backend stubs it spawns run in their own process group, which ``stop()``
    terminates as a whole, so no stub outlives the server.

    Server output (stdout and stderr) goes to ``log_file``; when ``None``, to a temporary
    file removed by ``stop()``.

    With ``stop_with_parent`` (the default) the kernel sends the server SIGTERM if the
    thread that called ``start()`` dies without stopping it (e.g. the test run is killed).
    Start the server from a thread that lives as long as the server, or pass ``False``.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        log_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        exit_timeout_s: int = 10,
        ready_timeout_s: float = 180.0,
        stop_with_parent: bool = True,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        free = iter(find_free_ports(3, _client_host(host)))
        self.http_port = http_port if http_port is not None else next(free)
        self.grpc_port = grpc_port if grpc_port is not None else next(free)
        self.metrics_port = metrics_port if metrics_port is not None else next(free)
        self.extra_args = tuple(extra_args)
        self.exit_timeout_s = exit_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.stop_with_parent = stop_with_parent
        self._log_path = Path(log_file).resolve() if log_file is not None else None
        self._temp_log_dir: str | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # Addresses ---------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        """``http://host:port`` of the HTTP/REST endpoint."""
        return f"http://{_client_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint, as ``tritonclient.grpc`` expects it."""
        return f"{_client_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics page."""
        return f"http://{_client_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        """The file receiving the server's output (``None`` before ``start()``)."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # Lifecycle ---------------------------------------------------------------------------

    def command(self, paths: TritonPaths) -> list[str]:
        """The ``tritonserver`` command line."""
        return [
            str(paths.server_bin),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={paths.backends_dir}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *self.extra_args,
        ]

    def start(self) -> None:
        """Launch the server process; returns without waiting for readiness."""
        if self._process is not None:
            raise TritonServerError("server already started")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} does not exist")
        paths = find_triton()
        prepare_python_backend(paths)
        if self._log_path is None:
            self._temp_log_dir = tempfile.mkdtemp(prefix="preemptserve-triton-")
            self._log_path = Path(self._temp_log_dir) / "tritonserver.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command(paths)
        logger.info("starting %s", " ".join(cmd))
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=build_env(paths),
                start_new_session=True,  # own process group, shared with the stubs
                preexec_fn=_terminate_with_parent() if self.stop_with_parent else None,
            )

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def metrics_enabled(self) -> bool:
        """Whether the server serves its metrics page (unless ``extra_args`` turn it off)."""
        return not any(arg in ("--allow-metrics=false", "--allow-metrics=0")
                       for arg in self.extra_args)

    def is_ready(self) -> bool:
        """Whether ``/v2/health/ready`` answers 200 (server up, every model loaded) and,
        when metrics are on, the metrics page answers too.

        Triton starts its metrics service a few milliseconds after the HTTP service, so a
        client that reads metrics right after readiness would otherwise be refused.
        """
        urls = [f"{self.http_url}/v2/health/ready"]
        if self.metrics_enabled:
            urls.append(self.metrics_url)
        try:
            for url in urls:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status != 200:
                        return False
            return True
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(
        self, timeout_s: float | None = None, interrupt: threading.Event | None = None
    ) -> bool:
        """Block until the server is ready; returns ``False`` only if ``interrupt`` got set.

        Raises ``TritonServerError`` with the tail of the server log when the process exits
        or ``timeout_s`` (default ``ready_timeout_s``) passes first.
        """
        if self._process is None:
            raise TritonServerError("server not started")
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            code = self._process.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} before becoming ready\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout_s:.0f} s\n{self.log_tail()}"
                )
            if interrupt is not None and interrupt.wait(0.25):
                return False
            if interrupt is None:
                time.sleep(0.25)
        logger.info("tritonserver ready: http %s, grpc %s", self.http_url, self.grpc_url)
        return True

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop the server and its stubs; returns its exit code (``None`` if never started).

        Sends SIGTERM to the process group so Triton can unload models (it waits up to
        ``exit_timeout_s`` for in-flight requests), then SIGKILLs the group if the server
        is still running after ``timeout_s`` or if stubs are left behind. Safe to call twice.
        """
        process = self._process
        if process is None:
            return None
        timeout_s = self.exit_timeout_s + 15 if timeout_s is None else timeout_s
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop in %.0f s; killing it", timeout_s)
        # Whatever is left of the group (the server, stubs) is killed; a group that is
        # already gone makes this a no-op.
        _signal_group(process.pid, signal.SIGKILL)
        code = process.wait()
        self._process = None
        if self._temp_log_dir is not None:
            shutil.rmtree(self._temp_log_dir, ignore_errors=True)
            self._temp_log_dir = None
            self._log_path = None
        return code

    def log_tail(self, num_lines: int = LOG_TAIL_LINES) -> str:
        """The last ``num_lines`` lines of the server log, under a header naming the file.

        Error lines from earlier in the log come first: Triton reports a model that fails
        to load long before it exits, and large status tables fill the tail in between.
        """
        if self._log_path is None or not self._log_path.exists():
            return "(no server log)"
        lines = self._log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        if not lines:
            return f"(server log {self._log_path} is empty)"
        tail = lines[-num_lines:]
        earlier_errors = [
            line
            for line in lines[:-num_lines]
            if _TRITON_ERROR_LINE.match(line) and not any(h in line for h in _HARMLESS_ERRORS)
        ]
        parts = []
        if earlier_errors:
            parts += [f"--- errors in {self._log_path} ---", *earlier_errors[-num_lines:]]
        parts += [f"--- last {len(tail)} lines of {self._log_path} ---", *tail]
        return "\n".join(parts)

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"TritonServer(repository={str(self.model_repository)!r}, http={self.http_port}, "
            f"grpc={self.grpc_port}, metrics={self.metrics_port}, pid={self.pid})"
        )


def _terminate_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent thread dies.

    Covers the parent being killed outright (SIGKILL, OOM), when ``stop()`` cannot run.
    The libc function is looked up before the fork so the child only makes the call.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux
    pr_set_pdeathsig = 1

    def set_parent_death_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return set_parent_death_signal


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
