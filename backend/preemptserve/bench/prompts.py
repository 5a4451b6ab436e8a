"""Prompts of exactly the requested number of tokens for the served model's tokenizer.

A prompt is a window of the shipped corpus, BOS first, kept only if its decoded text
re-encodes to the same ids: the server then sees exactly that many prompt tokens.
"""

from __future__ import annotations

from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np


class PromptBuilder:
    def __init__(self, tokenizer_path: str | Path | None = None) -> None:
        self._tokenizer_path = tokenizer_path

    @cached_property
    def tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        path = self._tokenizer_path
        if path is None:
            from ..model.default_model import ensure_default_model

            path = ensure_default_model() / "tokenizer.json"
        return Tokenizer.from_file(str(path))

    @cached_property
    def _corpus_ids(self) -> list[int]:
        corpus = resources.files("preemptserve").joinpath("assets", "corpus.txt")
        return self.tokenizer.encode(corpus.read_text(encoding="utf-8")).ids

    def prompt(self, num_tokens: int, rng: np.random.Generator) -> str:
        """Text that the tokenizer encodes to exactly ``num_tokens`` ids (BOS included)."""
        if num_tokens < 1:
            raise ValueError("a prompt needs at least one token")
        ids = self._corpus_ids
        bos, body = ids[0], ids[1:]
        if num_tokens - 1 > len(body) // 2:
            raise ValueError(f"{num_tokens} tokens is more than the corpus can supply")
        offset = int(rng.integers(0, len(body) - 2 * num_tokens))
        while True:  # the first window from ``offset`` that round-trips through text
            candidate = [bos, *body[offset : offset + num_tokens - 1]]
            text = self.tokenizer.decode(candidate, skip_special_tokens=True)
            if self.tokenizer.encode(text).ids == candidate:
                return text
            offset += 1

    def prompts(self, lengths: list[int], seed: int = 0) -> list[str]:
        rng = np.random.default_rng(seed)
        return [self.prompt(n, rng) for n in lengths]
