"""What the engine hands out: each step's ``RequestOutput`` per request, the engine's
``EngineStats``, and what a request may ask for beyond its tokens (log probs, logits,
timings, block counts).

A request that asks for none of them carries no ``RequestExtras`` and costs nothing more.
One that does gets one (``Request.extras``), filled on the engine thread as it runs: the
sampler leaves each step's log prob and raw logits in it, the model runner the prompt's
logits (by position, so a prefill done again after a preemption overwrites them), the
engine the times and block counts. The engine moves them into the ``RequestOutput`` of
the step (``take_step``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.request import Request, SamplingParams


@dataclass(frozen=True)
class RequestMetrics:
    """A request's timings (``time.monotonic()`` seconds) and KV blocks, so far.

    ``num_blocks_total``: the most device blocks its table has held; ``num_blocks_reused``
    of those it got from another sequence of the same prompt (``num_return_sequences``)
    instead of allocating them; the rest were new.
    """

    arrival_time_s: float
    first_scheduled_time_s: float | None
    first_token_time_s: float | None
    last_token_time_s: float | None
    num_blocks_total: int
    num_blocks_reused: int

    @property
    def num_blocks_new(self) -> int:
        return self.num_blocks_total - self.num_blocks_reused


@dataclass(eq=False)
class RequestExtras:
    want_log_probs: bool = False
    want_context_logits: bool = False
    want_generation_logits: bool = False
    want_metrics: bool = False
    num_prompt_tokens: int = 0
    # Left by the sampler for the step being run.
    step_log_prob: float | None = None
    step_logits: torch.Tensor | None = None  # [V] float32, CPU: the raw logits
    # [num_prompt_tokens, V] float32 on the CPU, filled by position by the model runner.
    context_logits: torch.Tensor | None = None
    context_logits_sent: bool = False
    first_token_time_s: float | None = None
    last_token_time_s: float | None = None
    num_blocks_total: int = 0
    num_blocks_reused: int = 0

    @classmethod
    def for_request(cls, sampling: SamplingParams, num_prompt_tokens: int,
                    want_metrics: bool) -> RequestExtras | None:
        """The extras a request with these params needs, or None if it needs none."""
        extras = cls(sampling.return_log_probs, sampling.return_context_logits,
                     sampling.return_generation_logits, want_metrics, num_prompt_tokens)
        wanted = (extras.want_log_probs or extras.want_context_logits
                  or extras.want_generation_logits or extras.want_metrics)
        return extras if wanted else None

    def store_context_logits(self, start: int, logits: torch.Tensor) -> None:
        """Logits of prompt positions ``start .. start + len(logits)``."""
        if self.context_logits is None:
            self.context_logits = torch.zeros(self.num_prompt_tokens, logits.shape[-1],
                                              dtype=torch.float32)
        self.context_logits[start : start + logits.shape[0]] = logits.to("cpu", torch.float32)

    def take_context_logits(self) -> torch.Tensor | None:
        """The prompt's logits, once (with the first output)."""
        if not self.want_context_logits or self.context_logits_sent:
            return None
        self.context_logits_sent = True
        return self.context_logits


@dataclass
class RequestOutput:
    """What one step produced for one request: new text and ids, and whether it ended."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # Only for requests that asked (``SamplingParams.return_*``, ``return_perf_metrics``):
    # the log prob of each token of ``token_ids``, the prompt's logits [num_prompt_tokens,
    # vocab] (with the first output), the raw logits of each token [len(token_ids),
    # vocab], and the request's timings and blocks so far.
    log_probs: list[float] | None = None
    context_logits: torch.Tensor | None = None
    generation_logits: torch.Tensor | None = None
    metrics: RequestMetrics | None = None


@dataclass
class EngineStats:
    num_waiting: int = 0
    num_running: int = 0
    num_preempted: int = 0
    num_blocks_used: int = 0
    num_blocks_total: int = 0
    num_preemptions_total: int = 0
    num_recomputations_total: int = 0
    num_generated_tokens_total: int = 0
    last_step_s: float = 0.0
    num_host_blocks_used: int = 0
    num_host_blocks_total: int = 0
    num_swap_outs_total: int = 0
    num_swap_ins_total: int = 0
    swap_out_bytes_total: int = 0
    swap_in_bytes_total: int = 0
    swap_time_s_total: float = 0.0
    # Cache modes: bytes one token costs in each (all layers), whether hidden mode is offered.
    kv_bytes_per_token: int = 0
    hidden_bytes_per_token: int = 0
    hidden_mode_available: bool = False
    num_hidden_tokens_total: int = 0  # tokens computed by requests in hidden mode
    num_mixed_mode_steps_total: int = 0  # iterations whose batch held both modes
    # Blocks sequences of one prompt got from another instead of allocating (``fork_of``).
    num_shared_blocks_total: int = 0


def request_metrics(request: Request) -> RequestMetrics:
    """The timings and block counts of a request with extras, as they stand."""
    extras = request.extras
    return RequestMetrics(
        arrival_time_s=request.arrival_time_s,
        first_scheduled_time_s=request.first_scheduled_time_s,
        first_token_time_s=extras.first_token_time_s,
        last_token_time_s=extras.last_token_time_s,
        num_blocks_total=extras.num_blocks_total,
        num_blocks_reused=extras.num_blocks_reused,
    )
