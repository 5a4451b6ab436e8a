"""Iteration and swap time as functions of the batch: what the simulator uses instead of a model.

One iteration of the engine is ``schedule -> swaps -> forward -> sample -> detokenize``.
Its time is modelled as linear in the batch's shape::

    t = fixed_s
      + per_prefill_token_s        * prefill tokens          (projections, MLP)
      + per_decode_token_s         * decode tokens
      + per_decode_context_token_s * sum of decode contexts  (decode attention reads the KV)
      + per_prefill_attention_s    * sum of chunk x context  (prefill attention, quadratic)
      + per_sampled_token_s        * sampled tokens          (serving: detokenize, respond)

and a swap of ``b`` bytes takes ``swap_fixed_s + b / swap_bytes_per_s``. On a CPU the
engine copies swaps synchronously before the forward (their time adds up); on a GPU they
run on a copy stream and only blocking ones delay the forward (``swap_overlaps_compute``).

``request_latency_s`` (client send to engine queue) and ``response_latency_s`` (engine
output to client) are one-way serving latencies added around the engine's timeline.

It also satisfies the scheduler's ``CostModel`` protocol (``prefill_time_s``), so
policies that estimate prefill time run on it in the simulator.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.scheduler.output import BatchShape, batch_shape

__all__ = [
    "COEFFICIENTS",
    "BatchShape",
    "IterationCostModel",
    "batch_shape",
    "load_profile",
    "profile_path",
]

COEFFICIENTS = (
    "fixed_s",
    "per_prefill_token_s",
    "per_decode_token_s",
    "per_decode_context_token_s",
    "per_prefill_attention_s",
    "per_sampled_token_s",
)


@dataclass(frozen=True)
class IterationCostModel:
    fixed_s: float = 0.0
    per_prefill_token_s: float = 0.0
    per_decode_token_s: float = 0.0
    per_decode_context_token_s: float = 0.0
    per_prefill_attention_s: float = 0.0
    per_sampled_token_s: float = 0.0
    swap_fixed_s: float = 0.0
    swap_bytes_per_s: float = float("inf")
    swap_overlaps_compute: bool = False
    request_latency_s: float = 0.0
    response_latency_s: float = 0.0
    # KV bytes of one token (all layers, K and V): turns kv_cache_bytes into blocks.
    kv_bytes_per_token: int = 0
    max_model_len: int = 0
    # For ``apt``'s hybrid cache (``HybridCostModel``): extra step seconds per KV-sized
    # block of context kept as hidden states (the simulator adds it per hidden-mode item
    # that recomputes K/V). ``None``: the engine offers no hidden mode.
    hidden_recompute_s_per_block: float | None = None
    # Measured spread of real iteration times around the model: quantiles (evenly spaced
    # probabilities from 0 to 1) of measured / modelled time over the profiling steps. When
    # set, the simulator multiplies each iteration by a draw from this distribution (seeded).
    noise_quantiles: tuple[float, ...] = ()
    # Or, measured on a server (``fit_served_iterations``): the measured / modelled ratios
    # of its iterations in their order. The simulator replays blocks of it of random start
    # and mean length ``noise_block_iterations`` (a stationary bootstrap), so that slow
    # stretches come in runs as they do on a shared machine. Takes precedence over
    # ``noise_quantiles`` (its marginal).
    noise_trace: tuple[float, ...] = ()
    noise_block_iterations: float = 1.0
    # Instances sharing one machine's cores (engines on a CPU): an instance's iteration
    # takes (1 + co_running_slowdown x the share of the other instances in a step) times
    # its batch's time. 0 where each instance has a device of its own (the GPU profiles).
    # Fitted by ``bench profile --server`` with several instances (``sim/fit.py``).
    co_running_slowdown: float = 0.0
    # Provenance: the command, machine and date, or the publication and derivation.
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        negative = [
            f.name
            for f in fields(self)
            if isinstance(getattr(self, f.name), float) and getattr(self, f.name) < 0
        ]
        if negative:
            raise ValueError(f"cost model coefficients must be >= 0: {negative}")
        if self.swap_bytes_per_s <= 0:
            raise ValueError("swap_bytes_per_s must be positive")
        if self.noise_block_iterations < 1.0:
            raise ValueError("noise_block_iterations must be >= 1")
        if any(r <= 0 for r in self.noise_trace):
            raise ValueError("noise_trace ratios must be positive")

    def iteration_time_s(self, shape: BatchShape) -> float:
        return (
            self.fixed_s
            + self.per_prefill_token_s * shape.num_prefill_tokens
            + self.per_decode_token_s * shape.num_decode_tokens
            + self.per_decode_context_token_s * shape.decode_context_tokens
            + self.per_prefill_attention_s * shape.prefill_attention_tokens
            + self.per_sampled_token_s * shape.num_sampled_tokens
        )

    def noise_factor(self, u: float) -> float:
        """The measured/modelled ratio at probability ``u`` in [0, 1) (1.0 if none)."""
        q = self.noise_quantiles
        if not q:
            return 1.0
        x = u * (len(q) - 1)
        i = min(int(x), len(q) - 2)
        return q[i] + (q[i + 1] - q[i]) * (x - i)

    def swap_time_s(self, num_bytes: int) -> float:
        return 0.0 if num_bytes <= 0 else self.swap_fixed_s + num_bytes / self.swap_bytes_per_s

    def prefill_time_s(self, num_tokens: int) -> float:
        """The ``CostModel`` protocol: one iteration prefilling ``num_tokens`` alone."""
        return self.iteration_time_s(
            BatchShape(
                num_prefill_tokens=num_tokens,
                prefill_attention_tokens=num_tokens * num_tokens,
                num_sampled_tokens=1,
            )
        )

    def with_coefficients(self, **values: Any) -> IterationCostModel:
        data = asdict(self)
        data.update(values)
        return IterationCostModel(**data)

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        if data["swap_bytes_per_s"] == float("inf"):
            data["swap_bytes_per_s"] = None
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> IterationCostModel:
        data = json.loads(Path(path).read_text())
        if data.get("swap_bytes_per_s") is None:
            data["swap_bytes_per_s"] = float("inf")
        data["noise_quantiles"] = tuple(data.get("noise_quantiles", ()))
        data["noise_trace"] = tuple(data.get("noise_trace", ()))
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown cost model fields {sorted(unknown)}")
        return cls(**data)


PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def profile_path(name_or_path: str | Path) -> Path:
    """A saved cost model's file: a path, or the name of one in ``sim/profiles/``."""
    path = Path(name_or_path)
    return path if path.exists() else PROFILES_DIR / f"{name_or_path}.json"


def load_profile(name_or_path: str | Path) -> IterationCostModel:
    """A saved cost model: a path, or the name of one in ``sim/profiles/`` (no ``.json``)."""
    return IterationCostModel.load(profile_path(name_or_path))
