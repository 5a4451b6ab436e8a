"""Scheduling policies. Importing this package registers every built-in policy."""

from . import fcfs  # noqa: F401  (registers "fcfs")
from .base import Scheduler
from .output import ScheduledRequest, SchedulerOutput
from .registry import available_policies, create_scheduler, register_policy

__all__ = [
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "available_policies",
    "create_scheduler",
    "register_policy",
]
