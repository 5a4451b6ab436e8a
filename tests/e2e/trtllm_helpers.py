"""Shared by the tests of ``model_repository_trtllm/``: a copy of the repository with
settings, the official client scripts run as they are, and a reference engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from preemptserve.config import CacheConfig, EngineConfig, SchedulerConfig
from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.model.default_model import ensure_default_model
from preemptserve.serving.trtllm_text import TextCodec

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "model_repository_trtllm"
UPSTREAM = ROOT / "tests" / "tensorrtllm_backend"  # the official scripts, unchanged
E2E_CLIENT = UPSTREAM / "inflight_batcher_llm" / "client" / "end_to_end_grpc_client.py"
TOKEN_CLIENT = UPSTREAM / "inflight_batcher_llm" / "client" / "inflight_batcher_llm_client.py"
END_TO_END_TEST = UPSTREAM / "tools" / "inflight_batcher_llm" / "end_to_end_test.py"
BENCHMARK = UPSTREAM / "tools" / "inflight_batcher_llm" / "benchmark_core_model.py"
# The data set format of the official tools: prompt = input + " " + instruction.
DATASET = [
    {"input": "Return a list of", "instruction": "the values.",
     "output": "one two three four five six"},
    {"input": "The value of", "instruction": "the file", "output": "a b c d e"},
    {"input": "If the file is", "instruction": "open", "output": "x y z"},
    {"input": "This module provides", "instruction": "a way", "output": "p q r s"},
]


def write_trtllm_repository(root: Path, parameters: Mapping[str, str] | None = None,
                            decoupled: bool = True) -> Path:
    """A copy of ``model_repository_trtllm`` with ``parameters`` set on ``tensorrt_llm``
    and, with ``decoupled=False``, ``tensorrt_llm`` and ``tensorrt_llm_bls`` in Triton's
    default (one response per request) mode, as the official repository filled with
    ``decoupled_mode:false``."""
    repo = root / "model_repository_trtllm"
    shutil.copytree(SOURCE, repo, ignore=shutil.ignore_patterns("__pycache__"))
    for model in ("tensorrt_llm", "tensorrt_llm_bls"):
        path = repo / model / "config.pbtxt"
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        config.model_transaction_policy.decoupled = decoupled
        if model == "tensorrt_llm":
            for name, value in (parameters or {}).items():
                config.parameters[name].string_value = str(value)
        path.write_text(text_format.MessageToString(config))
    return repo


def run_script(script: Path, args: Sequence[str], timeout_s: float = 300) -> str:
    """Run an upstream script with this interpreter; its stdout, or AssertionError with
    its output when it fails."""
    process = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                             text=True, timeout=timeout_s, cwd=script.parent)
    if process.returncode != 0:
        raise AssertionError(f"{script.name} {' '.join(args)} exited {process.returncode}\n"
                             f"--- stdout ---\n{process.stdout[-4000:]}\n"
                             f"--- stderr ---\n{process.stderr[-4000:]}")
    return process.stdout


class Reference:
    """The served checkpoint run in this process, one request at a time: what the server
    must answer for greedy requests (the engine itself is checked against transformers
    in tests/engine)."""

    def __init__(self) -> None:
        model_dir = ensure_default_model()
        self.codec = TextCodec(model_dir)
        self.engine = LLMEngine(EngineConfig(
            model_dir=str(model_dir), device="cpu",
            scheduler=SchedulerConfig(policy="fcfs"),
            cache=CacheConfig(kv_cache_bytes=32 * 2**20)))
        self._count = 0

    def run(self, prompt: str | list[int], max_tokens: int, **sampling) -> tuple[list[int],
                                                                               list[float]]:
        """Output token ids and their log probs."""
        self._count += 1
        request_id = f"ref-{self._count}"
        self.engine.add_request(request_id, prompt, SamplingParams(
            max_tokens=max_tokens, return_log_probs=True, **sampling))
        tokens, log_probs = [], []
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                tokens.extend(out.token_ids)
                log_probs.extend(out.log_probs)
        return tokens, log_probs

    def text(self, token_ids: list[int]) -> str:
        return self.codec.tokenizer.decode(token_ids)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.codec.tokenizer.encode(prompt)


def as_json(values: object) -> str:
    return json.dumps(values)
