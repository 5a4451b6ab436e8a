"""Policies are classes chosen by name from the config; adding one is adding a file.

A policy's config.pbtxt parameters are the fields of its ``options_class``
(``parameters.py``). One config.pbtxt may set the parameters of every registered policy
(the shipped one does): each is parsed and checked by the policies that declare it, and
only the chosen policy's are kept; a name no registered policy declares is unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ...config import SchedulerConfig, engine_parameter_names
from ..block_manager import BlockManager
from ..cost_model import CostModel
from .base import Clock, Scheduler

_POLICIES: dict[str, type[Scheduler]] = {}


def register_policy(name: str) -> Callable[[type[Scheduler]], type[Scheduler]]:
    def register(cls: type[Scheduler]) -> type[Scheduler]:
        if name in _POLICIES:
            raise ValueError(f"policy {name!r} registered twice")
        clash = set(cls.options_class.parameters()) & engine_parameter_names()
        if clash:
            raise ValueError(f"policy {name!r} declares parameters the engine owns: "
                             f"{sorted(clash)}")
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


def policy_parameter_names() -> set[str]:
    """The config.pbtxt names declared by any registered policy."""
    return {name for cls in _POLICIES.values() for name in cls.options_class.parameters()}


def options_from_parameters(policy: str, parameters: Mapping[str, str]) -> dict[str, Any]:
    """``SchedulerConfig.options`` of ``policy`` from config.pbtxt strings.

    Every parameter is parsed and checked by each registered policy that declares it, so
    a bad value fails the load whichever policy is chosen; only the values ``policy``
    declares are returned (the others are ignored). ``ValueError`` naming the parameter
    on a bad value, or if ``policy`` is not registered.
    """
    chosen = policy_class(policy)
    options: dict[str, Any] = {}
    for cls in _POLICIES.values():
        values = cls.options_class.parse(parameters)
        if cls is chosen:
            options = values
    return options


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
