"""Scheduling policies. Importing this package registers every built-in policy."""

from . import apt, fcfs, mlfq  # noqa: F401  (registers "apt", "fcfs", "skip_join_mlfq")
from .base import Scheduler
from .output import BlockSwap, ScheduledRequest, SchedulerOutput
from .registry import available_policies, create_scheduler, policy_class, register_policy

__all__ = [
    "BlockSwap",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "available_policies",
    "create_scheduler",
    "policy_class",
    "register_policy",
]
