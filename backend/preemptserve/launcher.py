"""Command line: serve a model repository with Triton until Ctrl-C or SIGTERM.

``python -m preemptserve.launcher`` (or ``preemptserve-launch``) starts the server with
``TritonServer``, waits until it is ready, prints how to reach it and keeps it in the
foreground.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .triton_server import DEFAULT_MODEL_REPOSITORY, REPO_ROOT, TritonServer, TritonServerError

logger = logging.getLogger(__name__)

def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="preemptserve-launch",
        description="Run Triton Inference Server (from the nvidia-pytriton wheel) on a "
        "model repository until Ctrl-C.",
    )
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--log-file", type=Path, default=None, help="server log file (default: a temporary file)"
    )
    parser.add_argument("--quiet", action="store_true", help="do not copy the server log to stderr")
    parser.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds (default: %(default)s)"
    )
    parser.add_argument(
        "--exit-timeout", type=int, default=10, help="seconds (default: %(default)s)"
    )
    parser.add_argument(
        "extra_args",
        nargs="*",
        help="more tritonserver options, after '--' (e.g. -- --log-verbose=1)",
    )
    return parser.parse_args(argv)


def _follow(path: Path, out: TextIO, stop: threading.Event) -> None:
    """Copy lines appended to ``path`` to ``out`` until ``stop`` is set."""
    while not path.exists() and not stop.is_set():
        time.sleep(0.1)
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            line = f.readline()
            if line:
                out.write(line)
                out.flush()
            elif stop.is_set():
                return
            else:
                time.sleep(0.1)


def _banner(server: TritonServer, model: str = "llm") -> str:
    repo = REPO_ROOT
    header = [
        "",
        f"Triton is serving {server.model_repository}",
        f"  gRPC     {server.grpc_url}",
        f"  HTTP     {server.http_url}",
        f"  metrics  {server.metrics_url}",
        *([f"  log      {server.log_path}"] if server.log_path else []),
        "",
    ]
    if (server.model_repository / "ensemble").is_dir():  # model_repository_trtllm
        client = repo / "tests/tensorrtllm_backend/inflight_batcher_llm/client"
        return "\n".join([
            *header,
            "TensorRT-LLM's models (docs/trtllm_drop_in.md); their own client:",
            f"  {repo}/.venv/bin/python {client}/end_to_end_grpc_client.py "
            f'-u {server.grpc_url} -S -p "The capital of France is" -o 32',
            "Or with curl:",
            f"  curl -s -X POST {server.http_url}/v2/models/ensemble/generate "
            '-d \'{"text_input": "What is machine learning?", "max_tokens": 20, '
            '"bad_words": "", "stop_words": ""}\'',
            "", "Press Ctrl-C to stop.", "",
        ])
    return "\n".join(
        [
            *header,
            "Stream tokens with the gRPC client:",
            f"  {repo}/.venv/bin/python {repo}/client/stream_client.py --url {server.grpc_url} "
            f'--model {model} --prompt "The capital of France is" --max-tokens 32',
            "Or with curl (server-sent events):",
            f"  curl -sN -X POST {server.http_url}/v2/models/{model}/generate_stream "
            '-d \'{"text_input": "The capital of France is", "max_tokens": 32, "stream": true}\'',
            "",
            "Press Ctrl-C to stop.",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit status."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = _parse_args(argv)

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop_requested.set()

    # Ctrl-C in a terminal reaches only this process (the server has its own session),
    # so the server is stopped through stop(), never left behind.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    server = TritonServer(
        args.model_repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        log_file=args.log_file,
        extra_args=args.extra_args,
        exit_timeout_s=args.exit_timeout,
    )
    follow_stop = threading.Event()
    follower: threading.Thread | None = None
    try:
        server.start()
        if not args.quiet and server.log_path is not None:
            follower = threading.Thread(
                target=_follow, args=(server.log_path, sys.stderr, follow_stop), daemon=True
            )
            follower.start()
        if not server.wait_ready(args.ready_timeout, interrupt=stop_requested):
            return 130
        sys.stdout.write(_banner(server))
        sys.stdout.flush()
        while not stop_requested.wait(0.5):
            if not server.is_running():
                logger.error("tritonserver exited unexpectedly\n%s", server.log_tail())
                return 1
        return 0
    except TritonServerError as e:
        logger.error("%s", e)
        return 1
    finally:
        code = server.stop()
        follow_stop.set()
        if follower is not None:
            follower.join(timeout=2)
        if code is not None:
            logger.info("tritonserver stopped (exit code %s)", code)


if __name__ == "__main__":
    sys.exit(main())
