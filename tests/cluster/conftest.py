"""Fixtures for cluster tests: the embedded checkpoint and the text of unmoved runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster_helpers import engine_config

from preemptserve.core.request import SamplingParams
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.model.default_model import ensure_default_model


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def reference(default_model_dir) -> Iterator[Callable[[str, SamplingParams], str]]:
    """``reference(prompt, sampling)``: the text of an unmoved run on one plain engine of
    the instances' configuration (computed once per pair)."""
    engine = LLMEngine(engine_config(default_model_dir))
    cache: dict[tuple[str, SamplingParams], str] = {}

    def text(prompt: str, sampling: SamplingParams) -> str:
        if (prompt, sampling) not in cache:
            cache[prompt, sampling] = engine.generate([prompt], sampling)[0]
        return cache[prompt, sampling]

    yield text
    engine.shutdown()
