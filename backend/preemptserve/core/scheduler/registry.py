"""Policies are classes chosen by name from the config; adding one is adding a file."""

from __future__ import annotations

from collections.abc import Callable

from ...config import SchedulerConfig
from ..block_manager import BlockManager
from ..cost_model import CostModel
from .base import Clock, Scheduler

_POLICIES: dict[str, type[Scheduler]] = {}


def register_policy(name: str) -> Callable[[type[Scheduler]], type[Scheduler]]:
    def register(cls: type[Scheduler]) -> type[Scheduler]:
        if name in _POLICIES:
            raise ValueError(f"policy {name!r} registered twice")
        cls.policy_name = name
        _POLICIES[name] = cls
        return cls

    return register


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def policy_class(name: str) -> type[Scheduler]:
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown scheduler policy {name!r}; available: {available_policies()}"
        ) from None


def create_scheduler(
    config: SchedulerConfig,
    block_manager: BlockManager,
    clock: Clock | None = None,
    cost_model: CostModel | None = None,
) -> Scheduler:
    """Instantiate the policy named by ``config.policy``; ``ValueError`` if unknown."""
    cls = policy_class(config.policy)
    if clock is None:
        return cls(config, block_manager, cost_model=cost_model)
    return cls(config, block_manager, clock, cost_model)
