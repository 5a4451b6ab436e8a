"""Frozen configuration, validated once and built from config.pbtxt parameters in one place.

No torch and no Triton imports here: the scheduler layer reads ``SchedulerConfig`` too.
The parameters of a scheduling policy are not listed here: the policy declares them
(``core/scheduler/parameters.py``) and ``serving_config_from_parameters`` asks the registry.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.scaling import ScalingPolicy


class FrozenOptions(Mapping[str, Any]):
    """A read-only dict (hashable, picklable): a policy's options in ``SchedulerConfig``."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(frozenset(self._values.items()))

    def __repr__(self) -> str:
        return repr(self._values)


@dataclass(frozen=True)
class SchedulerConfig:
    """Iteration-level batching limits, and the policy that fills each batch.

    ``options`` are the policy's own settings, by the field names of its options class
    (declared next to the policy, see ``core/scheduler/parameters.py``), e.g.
    ``SchedulerConfig(policy="skip_join_mlfq", options={"base_quantum_s": 0.01})``;
    those not given keep the policy's defaults. The policy checks them when it is built
    (``serving_config_from_parameters`` already has).
    """

    policy: str = "fcfs"
    max_batch_size: int = 32
    max_num_batched_tokens: int = 512
    options: Mapping[str, Any] = field(default_factory=FrozenOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.options, FrozenOptions):
            object.__setattr__(self, "options", FrozenOptions(self.options))
        if self.max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {self.max_batch_size}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_tokens must be positive, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: the pool's size in bytes (per device) and the block size in tokens."""

    kv_cache_bytes: int = 256 * 2**20
    block_size: int = 16
    # Host (pinned when CUDA is present) block pool for swapped-out KV; 0 disables it.
    host_kv_cache_bytes: int = 0
    # Offer hidden-cache mode (Apt-Serve) where the model allows it; false: K/V only.
    enable_hidden_cache: bool = True

    def __post_init__(self) -> None:
        if self.host_kv_cache_bytes < 0:
            raise ValueError(
                f"kv_cache_host_memory_bytes must be >= 0, got {self.host_kv_cache_bytes}")
        if self.block_size <= 0:
            raise ValueError(f"kv_block_size must be positive, got {self.block_size}")
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs. ``model_dir="default"`` selects the embedded model."""

    model_dir: str = "default"
    device: str = "auto"
    dtype: str = "float32"
    max_model_len: int | None = None
    # Saved prefill profile (JSON); empty: measure at startup (policies that need one).
    prefill_profile_path: str = ""
    # Ranks that each hold a slice of every layer's heads and of every KV block. The
    # KV byte budgets in ``cache`` are totals over all ranks (each holds 1/tp of them).
    tensor_parallel_size: int = 1
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


@dataclass(frozen=True)
class ClusterConfig:
    """Many engine instances behind one model (Llumnix): Ray actors, dispatch, migration.

    ``num_instances`` 1 (the default) is one engine in the model's own process, and Ray
    is not imported. Names and defaults follow Llumnix (``../shared/design/llumnix.md``
    section 1.7) where it has one.
    """

    num_instances: int = 1
    # "" starts a private Ray cluster on loopback, owned by the model (it ends with it);
    # "host:port" joins a running one (``ray start --head``), e.g. to spread instances
    # over machines.
    ray_address: str = ""
    # Ray's RAY_AUTH_MODE; "": "disabled" for the private loopback cluster, "token" when
    # joining one.
    ray_auth_mode: str = ""
    # Where the private cluster keeps its sockets and logs ("": Ray's default).
    ray_temp_dir: str = ""
    cpus_per_instance: int = 1  # Ray CPUs each instance asks for, and its torch threads
    dispatch_policy: str = "load"  # round_robin | balanced | load | load_llumnix
    enable_migration: bool = True
    migrate_out_threshold: float = 3.0  # overloaded: fewer free decode steps than this
    # Whether a move may go to an instance whose own queue is waiting (Llumnix: yes).
    # Off: only to instances with no waiting request (``pair_migrations``).
    migrate_into_waiting: bool = False
    migration_max_stages: int = 3
    migration_last_stage_max_blocks: int = 16
    migration_request_policy: str = "SR"  # SR | LR | LCR | FCW | FCWSR
    migration_transport: str = "object_store"  # object_store | gloo
    polling_interval_ms: int = 50  # load reports, output polls, migration pairing
    # A reservation for a move in no call of its source this long is freed (the source
    # died), Llumnix's PENDING_MIGRATE_IN_TIMEOUT; also the limit of each remote call.
    migration_timeout_s: float = 10.0
    # KV blocks an instance holding a high-priority request keeps out of normal requests'
    # reach (Llumnix's priority headroom, ``core/scheduler/load.py``); 0: none.
    priority_headroom_blocks: int = 0
    # Auto-scaling (``core/scaling.py``): add instances while the cluster's freeness stays
    # below scale_up_threshold for scaling_interval_s, drain one while the freeness
    # without it stays above scale_down_threshold, between min_instances and
    # max_instances (0: num_instances). Acted on by the cluster frontend
    # (``cluster/frontend.py``): with it the model runs a cluster even from one instance.
    enable_scaling: bool = False
    min_instances: int = 1
    max_instances: int = 0
    scale_up_threshold: float = 10.0
    scale_down_threshold: float = 60.0
    scaling_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.cpus_per_instance < 1:
            raise ValueError(f"cpus_per_instance must be >= 1, got {self.cpus_per_instance}")
        if self.migration_transport not in ("object_store", "gloo"):
            raise ValueError("migration_transport must be object_store or gloo, got "
                             f"{self.migration_transport!r}")
        if self.ray_auth_mode not in ("", "token", "disabled"):
            raise ValueError(f"ray_auth_mode must be token or disabled, got "
                             f"{self.ray_auth_mode!r}")
        if self.polling_interval_ms <= 0 or self.migration_timeout_s <= 0:
            raise ValueError("polling_interval_ms and migration_timeout_s must be positive")
        if self.migration_max_stages < 1 or self.migration_last_stage_max_blocks < 0:
            raise ValueError("need migration_max_stages >= 1 and "
                             "migration_last_stage_max_blocks >= 0")
        if self.priority_headroom_blocks < 0:
            raise ValueError("priority_headroom_blocks must be >= 0, got "
                             f"{self.priority_headroom_blocks}")
        if self.min_instances < 1:
            raise ValueError(f"min_instances must be >= 1, got {self.min_instances}")
        if self.max_instances and self.max_instances < self.min_instances:
            raise ValueError(f"max_instances ({self.max_instances}) must be 0 (num_instances)"
                             f" or >= min_instances ({self.min_instances})")
        if self.enable_scaling and not (
                self.min_instances <= self.num_instances <= self.scaling_max_instances):
            raise ValueError(f"with enable_scaling, need min_instances ({self.min_instances})"
                             f" <= num_instances ({self.num_instances}) <= max_instances "
                             f"({self.scaling_max_instances})")
        if not (math.isfinite(self.scale_up_threshold)
                and math.isfinite(self.scale_down_threshold)
                and self.scale_down_threshold > self.scale_up_threshold):
            raise ValueError("need finite scaling thresholds with scale_down_threshold "
                             f"({self.scale_down_threshold}) > scale_up_threshold "
                             f"({self.scale_up_threshold})")
        if not (math.isfinite(self.scaling_interval_s) and self.scaling_interval_s > 0):
            raise ValueError(
                f"scaling_interval_s must be positive, got {self.scaling_interval_s}")
        from .core.global_scheduler import DISPATCH_POLICIES, REQUEST_POLICIES

        if self.dispatch_policy not in DISPATCH_POLICIES:
            raise ValueError(f"dispatch_policy must be one of {', '.join(DISPATCH_POLICIES)}"
                             f", got {self.dispatch_policy!r}")
        if self.migration_request_policy not in REQUEST_POLICIES:
            raise ValueError("migration_request_policy must be one of "
                             f"{', '.join(REQUEST_POLICIES)}, got "
                             f"{self.migration_request_policy!r}")

    @property
    def scaling_max_instances(self) -> int:
        """``max_instances``, or ``num_instances`` when it is 0."""
        return self.max_instances or self.num_instances

    def scaling_policy(self) -> ScalingPolicy:
        """The ``core/scaling.py`` policy these settings describe."""
        from .core.scaling import ScalingPolicy

        return ScalingPolicy(self.min_instances, self.scaling_max_instances,
                             self.scale_up_threshold, self.scale_down_threshold,
                             self.scaling_interval_s)


@dataclass(frozen=True)
class ServingConfig:
    """Settings of the Triton adapter and its engine loop."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    cancellation_check_period_ms: int = 50
    exclude_input_in_output: bool = True
    # An engine that cannot go on (a tensor-parallel rank died) unloads its Triton model,
    # so that the model's ready endpoint says no. Needs --model-control-mode=explicit.
    unload_model_on_failure: bool = False
    # Append one JSON line per engine iteration to this file (batch shape, step time,
    # queues); empty: off. ``bench profile --server`` fits the simulator to it. With
    # several instances each writes its own (``iters.jsonl`` -> ``iters-instance0.jsonl``).
    iteration_stats_path: str = ""
    # Overload protection (TensorRT-LLM's name): at most this many requests may wait, that
    # is be accepted and never scheduled yet (preempted requests do not count); a request
    # arriving when that many wait gets an error at once and never enters the scheduler.
    # 0: unbounded.
    max_queue_size: int = 0

    def __post_init__(self) -> None:
        # The engine loop waits on its inbox with this timeout: a negative one raises in
        # that thread and zero spins while idle.
        if self.cancellation_check_period_ms <= 0:
            raise ValueError(
                "cancellation_check_period_ms must be positive, "
                f"got {self.cancellation_check_period_ms}"
            )
        if self.max_queue_size < 0:
            raise ValueError(
                f"max_queue_size must be >= 0 (0: unbounded), got {self.max_queue_size}")


# config.pbtxt parameter name -> (section, field, parser). Names follow TensorRT-LLM's
# backend where one exists (max_num_tokens, batch_scheduler_policy style).
def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


_PARAMETERS = {
    "model_dir": ("engine", "model_dir", str),
    "device": ("engine", "device", str),
    "dtype": ("engine", "dtype", str),
    "max_model_len": ("engine", "max_model_len", int),
    "scheduler_policy": ("scheduler", "policy", str),
    "max_batch_size": ("scheduler", "max_batch_size", int),
    "max_num_tokens": ("scheduler", "max_num_batched_tokens", int),
    "kv_cache_bytes": ("cache", "kv_cache_bytes", int),
    "kv_block_size": ("cache", "block_size", int),
    "kv_cache_host_memory_bytes": ("cache", "host_kv_cache_bytes", int),
    "enable_hidden_cache": ("cache", "enable_hidden_cache", _parse_bool),
    "prefill_profile_path": ("engine", "prefill_profile_path", str),
    "tensor_parallel_size": ("engine", "tensor_parallel_size", int),
    "cancellation_check_period_ms": ("serving", "cancellation_check_period_ms", int),
    "exclude_input_in_output": ("serving", "exclude_input_in_output", _parse_bool),
    "unload_model_on_failure": ("serving", "unload_model_on_failure", _parse_bool),
    "iteration_stats_path": ("serving", "iteration_stats_path", str),
    "max_queue_size": ("serving", "max_queue_size", int),
    "num_instances": ("cluster", "num_instances", int),
    "ray_address": ("cluster", "ray_address", str),
    "ray_auth_mode": ("cluster", "ray_auth_mode", str),
    "ray_temp_dir": ("cluster", "ray_temp_dir", str),
    "cpus_per_instance": ("cluster", "cpus_per_instance", int),
    "dispatch_policy": ("cluster", "dispatch_policy", str),
    "enable_migration": ("cluster", "enable_migration", _parse_bool),
    "migrate_out_threshold": ("cluster", "migrate_out_threshold", float),
    "migrate_into_waiting": ("cluster", "migrate_into_waiting", _parse_bool),
    "migration_max_stages": ("cluster", "migration_max_stages", int),
    "migration_last_stage_max_blocks": ("cluster", "migration_last_stage_max_blocks", int),
    "migration_request_policy": ("cluster", "migration_request_policy", str),
    "migration_transport": ("cluster", "migration_transport", str),
    "polling_interval_ms": ("cluster", "polling_interval_ms", int),
    "migration_timeout_s": ("cluster", "migration_timeout_s", float),
    "priority_headroom_blocks": ("cluster", "priority_headroom_blocks", int),
    "enable_scaling": ("cluster", "enable_scaling", _parse_bool),
    "min_instances": ("cluster", "min_instances", int),
    "max_instances": ("cluster", "max_instances", int),
    "scale_up_threshold": ("cluster", "scale_up_threshold", float),
    "scale_down_threshold": ("cluster", "scale_down_threshold", float),
    "scaling_interval_s": ("cluster", "scaling_interval_s", float),
}


def serving_config_from_parameters(parameters: Mapping[str, str]) -> ServingConfig:
    """Build the config from ``{name: string_value}``; empty values keep the default.

    Besides the names above, a parameter may be one a registered scheduling policy
    declares. Those of every registered policy are accepted and checked (one config.pbtxt
    may carry settings for each policy, as the shipped one does), and only the chosen
    policy's reach ``SchedulerConfig.options``: the others are ignored.

    Raises ``ValueError`` naming the parameter on an unknown name or a bad value.
    """
    # Here, not at the top: the scheduler package imports this module.
    from .core.scheduler.registry import (
        options_from_parameters,
        policy_class,
        policy_parameter_names,
    )

    policy_names = policy_parameter_names()
    sections: dict[str, dict[str, object]] = {
        "engine": {}, "scheduler": {}, "cache": {}, "serving": {}, "cluster": {}
    }
    policy_values: dict[str, str] = {}
    for name, raw in parameters.items():
        if name not in _PARAMETERS and name not in policy_names:
            known = ", ".join(sorted(_PARAMETERS.keys() | policy_names))
            raise ValueError(f"unknown parameter {name!r}; known: {known}")
        if raw is None or str(raw).strip() == "" or str(raw).startswith("${"):
            continue
        if name not in _PARAMETERS:
            policy_values[name] = str(raw)
            continue
        section, key, parse = _PARAMETERS[name]
        try:
            sections[section][key] = parse(str(raw).strip())
        except ValueError as exc:
            raise ValueError(f"parameter {name}={raw!r}: {exc}") from exc
    policy = str(sections["scheduler"].get("policy", SchedulerConfig.policy))
    try:
        policy_class(policy)
    except ValueError as exc:
        raise ValueError(f"parameter scheduler_policy={policy!r}: {exc}") from exc
    scheduler = SchedulerConfig(**sections["scheduler"],  # type: ignore[arg-type]
                                options=options_from_parameters(policy, policy_values))
    engine = EngineConfig(
        scheduler=scheduler,
        cache=CacheConfig(**sections["cache"]),  # type: ignore[arg-type]
        **sections["engine"],  # type: ignore[arg-type]
    )
    try:
        cluster = ClusterConfig(**sections["cluster"])  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"cluster parameters: {exc}") from exc
    return ServingConfig(engine=engine, cluster=cluster,
                         **sections["serving"])  # type: ignore[arg-type]


def engine_parameter_names() -> frozenset[str]:
    """The config.pbtxt names this module owns (policies may not declare these)."""
    return frozenset(_PARAMETERS)


def parameter_names() -> list[str]:
    """Every accepted config.pbtxt name, the registered policies' included."""
    from .core.scheduler.registry import policy_parameter_names

    return sorted(_PARAMETERS.keys() | policy_parameter_names())


__all__ = [
    "CacheConfig",
    "ClusterConfig",
    "EngineConfig",
    "FrozenOptions",
    "SchedulerConfig",
    "ServingConfig",
    "engine_parameter_names",
    "parameter_names",
    "serving_config_from_parameters",
]
