"""Request state as the scheduler sees it: token ids, progress and status. No torch."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

# Below this, temperature scaling overflows float32 logits: treat as greedy (as vLLM does).
_GREEDY_TEMPERATURE = 1e-5


class RequestStatus(enum.IntEnum):
    """Ordered like vLLM's: every status above ``PREEMPTED`` is terminal.

    ``MIGRATING``: handed over to another engine. The policy no longer schedules it and
    its blocks are pinned until the move commits (they are freed) or aborts (it resumes).
    """

    WAITING = enum.auto()
    RUNNING = enum.auto()
    MIGRATING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


class CacheMode(enum.Enum):
    """What a request keeps per layer for its past tokens.

    ``KV``: keys and values (``2 * num_kv_heads * head_dim`` values per token).
    ``HIDDEN``: the attention block's normalised input (``hidden_size`` values per token);
    K and V of past tokens are recomputed from it at every step (Apt-Serve's hidden
    cache: half the memory of K/V for multi-head attention, more compute).
    """

    KV = "kv"
    HIDDEN = "hidden"


# Request priorities (the ``priority`` request parameter). High-priority requests get
# memory headroom in the cluster's load reports (``core/scheduler/load.py``) and go first
# among equals in the local policies.
PRIORITIES = ("high", "normal")
HIGH_PRIORITY = "high"
NORMAL_PRIORITY = "normal"


def check_priority(priority: str) -> str:
    """``priority`` if it is one of ``PRIORITIES``; else ``ValueError`` naming them."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be 'high' or 'normal', got {priority!r}")
    return priority


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings, with TensorRT-LLM's conventions.

    Greedy when ``temperature < 1e-5``, ``top_k == 1``, or neither ``top_k`` nor ``top_p``
    is set (``top_k == 0 and top_p == 0``, TensorRT-LLM's default).
    ``min_length`` suppresses ``end_id`` and stop words until that many tokens exist
    (``may_stop_at``: the one place that rule is written).

    Logit processing (TensorRT-LLM's set; every default leaves the logits untouched):
    ``repetition_penalty`` divides positive logits and multiplies negative ones of every
    token seen in prompt + output; ``presence_penalty`` subtracts once per seen token and
    ``frequency_penalty`` once per occurrence (prompt + output, as TensorRT-LLM counts);
    ``logit_bias`` adds ``(token_id, bias)`` pairs (TensorRT-LLM's ``embedding_bias``);
    ``bad_words`` are token sequences never completed (the last token of one is banned
    while the tokens before it end the sequence). ``stop_token_ids`` are token sequences
    that end the output when it ends with one; unlike ``stop`` strings they stay in it.
    ``return_log_probs``, ``return_context_logits``, ``return_generation_logits`` ask the
    engine for those outputs; they change nothing else.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    min_length: int = 0
    end_id: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    bad_words: tuple[tuple[int, ...], ...] = ()
    stop_token_ids: tuple[tuple[int, ...], ...] = ()
    return_log_probs: bool = False
    return_context_logits: bool = False
    return_generation_logits: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        # NaN passes a plain ``< 0`` check and would poison the whole batch's sampling.
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {self.min_length}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"random_seed must fit in uint64, got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop words must be non-empty strings")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(
                f"repetition_penalty must be positive and finite, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if any(len(pair) != 2 or pair[0] < 0 or not math.isfinite(pair[1])
               for pair in self.logit_bias):
            raise ValueError("logit_bias must hold (token_id >= 0, finite bias) pairs")
        for name in ("bad_words", "stop_token_ids"):
            if any(not words or any(t < 0 for t in words) for words in getattr(self, name)):
                raise ValueError(f"{name} must be non-empty sequences of token ids >= 0")

    @property
    def processes_logits(self) -> bool:
        """Whether any penalty, bias or banned word changes the logits before sampling."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty
                    or self.frequency_penalty or self.logit_bias or self.bad_words)

    def may_stop_at(self, index: int) -> bool:
        """Whether output token ``index`` (0-based) may end the output by ``end_id`` or a
        stop word: only once ``min_length`` tokens precede it."""
        return index >= self.min_length

    @property
    def greedy(self) -> bool:
        return (
            self.temperature < _GREEDY_TEMPERATURE
            or self.top_k == 1
            or (self.top_k == 0 and self.top_p == 0.0)
        )


@dataclass(eq=False)
class Request:
    """One generation job.

    ``num_computed_tokens`` counts the leading tokens of ``all_token_ids`` whose K/V are in
    the cache. A running decode request has ``num_computed_tokens == num_tokens - 1``: its
    last sampled token is fed in the next step. Preemption by recomputation resets it to 0.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time_s: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_time_s: float | None = None
    # Set by the policy while the request holds no cache; changes only through
    # preemption by recomputation.
    cache_mode: CacheMode = CacheMode.KV
    # Latency objectives (seconds) of this request; None: the policy's defaults.
    ttft_slo_s: float | None = None
    tbt_slo_s: float | None = None
    # "high" or "normal" (``PRIORITIES``).
    priority: str = NORMAL_PRIORITY
    # Attached by the engine (opaque here: no torch in the core): the request's sampling
    # RNG (None when greedy) and its incremental detokenizer.
    generator: Any = field(default=None, repr=False)
    detokenizer: Any = field(default=None, repr=False)
    # Attached by the engine when the request asked for more than tokens (log probs,
    # logits, timings: ``engine/outputs.py``); None otherwise.
    extras: Any = field(default=None, repr=False)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.sampling.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """``stop``, ``length``, ``abort`` or ``error`` once finished, else None."""
        return FINISH_REASONS.get(self.status)

    @property
    def is_high_priority(self) -> bool:
        return self.priority == HIGH_PRIORITY

    @property
    def hidden(self) -> bool:
        return self.cache_mode is CacheMode.HIDDEN

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens ``[start, stop)`` of prompt + output."""
        n = self.num_prompt_tokens
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n : stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n]
