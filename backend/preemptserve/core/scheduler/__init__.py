"""Scheduling policies. Importing this package registers every policy.

Every module of the package is imported here, and a module that defines a policy
registers it (``@register_policy``): adding a policy is adding a file, its settings
included (``parameters.py``).
"""

import importlib
import pkgutil

from .base import Scheduler
from .output import BlockSwap, ScheduledRequest, SchedulerOutput
from .parameters import Parameter, PolicyOptions, parameter
from .registry import available_policies, create_scheduler, policy_class, register_policy

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BlockSwap",
    "Parameter",
    "PolicyOptions",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "available_policies",
    "create_scheduler",
    "parameter",
    "policy_class",
    "register_policy",
]
