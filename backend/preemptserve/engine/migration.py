"""A request as plain data, to continue on another engine (live migration, Llumnix-style).

``RequestSnapshot`` is everything an engine holds of a request apart from its KV blocks:
tokens, progress, sampling parameters, the sampling RNG's state, the detokenizer's
offsets and the policy's own state (MLFQ level and attained service, apt's SLO record).
Times travel as ages, not clock readings: clocks differ between processes. The KV moves
separately (``LLMEngine.read_blocks`` / ``write_blocks``), in one piece or in stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.request import CacheMode, Request, SamplingParams


@dataclass(frozen=True)
class RequestSnapshot:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling: SamplingParams
    num_computed_tokens: int
    num_preemptions: int
    cache_mode: CacheMode
    age_s: float  # since arrival
    started_age_s: float | None  # since first scheduled; None: never scheduled
    ttft_slo_s: float | None
    tbt_slo_s: float | None
    generator_state: bytes | None
    detokenizer_state: dict[str, Any]
    policy: str
    policy_state: dict[str, Any] = field(default_factory=dict)
    # Where its KV is on the source (``on_host``) and in how many blocks; 0 blocks: it
    # holds no cache (never started, or preempted by recomputation).
    on_host: bool = False
    num_blocks: int = 0

    @classmethod
    def of(cls, request: Request, now_s: float, generator_state: bytes | None, policy: str,
           policy_state: dict[str, Any], on_host: bool, num_blocks: int) -> RequestSnapshot:
        started = request.first_scheduled_time_s
        return cls(
            request_id=request.request_id,
            prompt_token_ids=tuple(request.prompt_token_ids),
            output_token_ids=tuple(request.output_token_ids),
            sampling=request.sampling,
            num_computed_tokens=request.num_computed_tokens,
            num_preemptions=request.num_preemptions,
            cache_mode=request.cache_mode,
            age_s=now_s - request.arrival_time_s,
            started_age_s=None if started is None else now_s - started,
            ttft_slo_s=request.ttft_slo_s,
            tbt_slo_s=request.tbt_slo_s,
            generator_state=generator_state,
            detokenizer_state=request.detokenizer.export_state(),
            policy=policy,
            policy_state=policy_state,
            on_host=on_host,
            num_blocks=num_blocks,
        )

    def to_request(self, now_s: float) -> Request:
        """The request again (without its RNG and detokenizer: the engine attaches them)."""
        return Request(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            sampling=self.sampling,
            arrival_time_s=now_s - self.age_s,
            output_token_ids=list(self.output_token_ids),
            num_computed_tokens=self.num_computed_tokens,
            num_preemptions=self.num_preemptions,
            first_scheduled_time_s=(None if self.started_age_s is None
                                    else now_s - self.started_age_s),
            cache_mode=self.cache_mode,
            ttft_slo_s=self.ttft_slo_s,
            tbt_slo_s=self.tbt_slo_s,
        )
