"""What a request may ask for beyond its tokens: log probs, logits, timings, block counts.

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

from ..core.request import SamplingParams


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
