"""Per-request token sampling: greedy, temperature, top-k, top-p, seeded generators."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..core.request import SamplingParams


class SamplingState(NamedTuple):
    """What sampling one request's next token needs beyond its logits: its params, its
    private RNG (so its samples do not depend on the batch) and the tokens before it."""

    params: SamplingParams
    generator: torch.Generator | None
    num_output_tokens: int = 0

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device) -> SamplingState:
        return cls(params, new_generator(params, device))


def new_generator(params: SamplingParams, device: torch.device,
                  state: bytes | None = None) -> torch.Generator | None:
    """A request's RNG: seeded, randomly seeded, or restored from ``generator_state``."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if state is not None:
        generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    elif params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    return generator


def generator_state(generator: torch.Generator | None) -> bytes | None:
    """The RNG's state as bytes (what moves with a request to another engine)."""
    return None if generator is None else generator.get_state().numpy().tobytes()


def sample(logits: torch.Tensor, states: Sequence[SamplingState]) -> list[int]:
    """logits: [S, V] float32, one row per state. Returns one token id per row."""
    for row, state in enumerate(states):
        end_id = state.params.end_id
        if end_id is not None and not state.params.may_stop_at(state.num_output_tokens):
            logits[row, end_id] = float("-inf")
    tokens = logits.argmax(dim=-1).tolist()
    for row, state in enumerate(states):
        if not state.params.greedy:
            tokens[row] = _sample_row(logits[row], state.params, state.generator)
    return tokens


def _sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p (keep at least one).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
