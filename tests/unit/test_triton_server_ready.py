"""Readiness of a ``TritonServer``: the health endpoint and, when metrics are on, the
metrics page (Triton starts its metrics service just after HTTP)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from preemptserve.triton_server import TritonServer, find_free_ports


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(port: int) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", port), _Ok)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_ready_waits_for_the_metrics_page(tmp_path, serve):
    http_port, metrics_port = find_free_ports(2, "127.0.0.1")
    server = TritonServer(tmp_path, http_port=http_port, metrics_port=metrics_port)
    serve(http_port)
    assert not server.is_ready()  # health answers, metrics not yet
    serve(metrics_port)
    assert server.is_ready()


def test_ready_without_metrics_needs_only_health(tmp_path, serve):
    http_port, metrics_port = find_free_ports(2, "127.0.0.1")
    server = TritonServer(tmp_path, http_port=http_port, metrics_port=metrics_port,
                          extra_args=["--allow-metrics=false"])
    serve(http_port)
    assert server.is_ready()
