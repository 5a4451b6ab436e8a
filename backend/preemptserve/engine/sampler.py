"""Per-request token sampling: greedy, temperature, top-k, top-p, seeded generators; the
logit processors of TensorRT-LLM's sampling config (penalties, bias, bad words) and the
log probability of each sampled token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..core.request import SamplingParams

if TYPE_CHECKING:
    from .outputs import RequestExtras


class SamplingState(NamedTuple):
    """What sampling one request's next token needs beyond its logits: its params, its
    private RNG (so its samples do not depend on the batch) and the tokens before it.

    ``history`` (prompt ids, output ids) is given when the params process logits
    (penalties, banned words); ``extras`` when the request wants more than the token
    (its log prob, its logits): ``sample`` leaves them there.
    """

    params: SamplingParams
    generator: torch.Generator | None
    num_output_tokens: int = 0
    history: tuple[Sequence[int], Sequence[int]] | None = None
    extras: RequestExtras | None = None

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
    """logits: [S, V] float32, one row per state. Returns one token id per row.

    Rows are processed in place: penalties, bias and banned words (``process_logits``),
    then ``end_id`` is masked while ``min_length`` forbids stopping. A state with
    ``extras`` gets the row's raw logits and the sampled token's log probability there.
    """
    for row, state in enumerate(states):
        if state.extras is not None and state.extras.want_generation_logits:
            state.extras.step_logits = logits[row].detach().to("cpu", copy=True)
        if state.params.processes_logits:
            process_logits(logits[row], state.params, state.history)
        end_id = state.params.end_id
        if end_id is not None and not state.params.may_stop_at(state.num_output_tokens):
            logits[row, end_id] = float("-inf")
    tokens = logits.argmax(dim=-1).tolist()
    for row, state in enumerate(states):
        want_log_prob = state.extras is not None and state.extras.want_log_probs
        if not state.params.greedy:
            scaled = logits[row] / state.params.temperature
            tokens[row] = _sample_row(scaled, state.params, state.generator)
        elif want_log_prob:
            scaled = logits[row]
        if want_log_prob:
            assert state.extras is not None
            state.extras.step_log_prob = float(
                torch.log_softmax(scaled, dim=-1)[tokens[row]])
    return tokens


def process_logits(logits: torch.Tensor, params: SamplingParams,
                   history: tuple[Sequence[int], Sequence[int]] | None) -> None:
    """Apply the params' penalties, bias and banned words to one row of logits, in place.

    ``history``: (prompt ids, output ids), the tokens penalties count and banned
    sequences are matched against.
    """
    prompt_ids, output_ids = history if history is not None else ((), ())
    vocab_size = logits.shape[-1]
    if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
        seen_ids = torch.tensor([*prompt_ids, *output_ids], dtype=torch.long,
                                device=logits.device)
        counts = torch.bincount(seen_ids, minlength=vocab_size)[:vocab_size]
        seen = counts > 0
        if params.repetition_penalty != 1.0:
            penalty = params.repetition_penalty
            logits.copy_(torch.where(seen & (logits > 0), logits / penalty, logits))
            logits.copy_(torch.where(seen & (logits < 0), logits * penalty, logits))
        if params.presence_penalty:
            logits.sub_(seen.to(logits.dtype) * params.presence_penalty)
        if params.frequency_penalty:
            logits.sub_(counts.to(logits.dtype) * params.frequency_penalty)
    for token_id, bias in params.logit_bias:
        logits[token_id] += bias
    if params.bad_words:
        tail = _tail(prompt_ids, output_ids, max(len(w) for w in params.bad_words) - 1)
        for words in params.bad_words:
            prefix = list(words[:-1])
            if not prefix or tail[len(tail) - len(prefix):] == prefix:
                logits[words[-1]] = float("-inf")


def _tail(prompt_ids: Sequence[int], output_ids: Sequence[int], n: int) -> list[int]:
    """The last ``n`` tokens of prompt + output (fewer if there are fewer)."""
    if n <= 0:
        return []
    tail = list(output_ids[-n:])
    missing = n - len(tail)
    if missing > 0:
        tail = list(prompt_ids[max(0, len(prompt_ids) - missing):]) + tail
    return tail


def _sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Draw from ``logits`` (already divided by the temperature) after top-k / top-p."""
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
