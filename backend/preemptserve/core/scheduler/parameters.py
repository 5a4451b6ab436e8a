"""A policy's own settings, declared next to its code. No torch, no Triton.

A policy names a frozen dataclass of options (``Scheduler.options_class``, a subclass of
``PolicyOptions``) whose fields are declared with ``parameter()``: each field is one
config.pbtxt parameter, with its name there, how its string is read (``*_ms`` parameters
become seconds), its default, the check its value must pass and a line of documentation::

    @dataclass(frozen=True)
    class MyOptions(PolicyOptions):
        window_s: float = parameter("my_window_ms", 1.0, milliseconds, positive,
                                    "how far back the policy looks")

``SchedulerConfig.options`` holds the chosen policy's values by field name
(``{"window_s": 0.5}``); the policy reads them, checked, as ``self.options.window_s``.
``serving_config_from_parameters`` finds the declarations through the registry, so
config.py never lists a policy's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

_PARAMETER = "preemptserve.parameter"  # the key of a field's metadata
_Options = TypeVar("_Options", bound="PolicyOptions")


@dataclass(frozen=True)
class Check:
    """What a value must satisfy, and how the error says it (``"must be positive"``)."""

    holds: Callable[[Any], bool]
    requirement: str


positive = Check(lambda value: value > 0, "must be positive")


def at_least(bound: float) -> Check:
    return Check(lambda value: value >= bound, f"must be >= {bound:g}")


# A share that cannot be everything.
fraction = Check(lambda value: 0.0 <= value < 1.0, "must be in [0, 1)")


def milliseconds(text: str) -> float:
    """config.pbtxt's milliseconds -> the seconds the policy reads."""
    return float(text) / 1000.0


@dataclass(frozen=True)
class Parameter:
    """One config.pbtxt parameter of a policy (the metadata of an options field)."""

    name: str  # as written in config.pbtxt
    parse: Callable[[str], Any]  # its string value -> the field's value (units converted)
    check: Check | None = None
    doc: str = ""

    def violation(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``"must be positive"``), None if nothing."""
        if self.check is None or self.check.holds(value):
            return None
        return self.check.requirement


def parameter(name: str, default: Any, parse: Callable[[str], Any] = float,
              check: Check | None = None, doc: str = "") -> Any:
    """An options field that config.pbtxt sets through the parameter ``name``."""
    return field(default=default, metadata={_PARAMETER: Parameter(name, parse, check, doc)})


@dataclass(frozen=True)
class PolicyOptions:
    """Base of every policy's options: a policy with no settings of its own uses it as is."""

    def __post_init__(self) -> None:
        for name, (attribute, declared) in self.parameters().items():
            value = getattr(self, attribute)
            violation = declared.violation(value)
            if violation:
                raise ValueError(f"{name} {violation}, got {attribute}={value!r}")

    @classmethod
    def parameters(cls) -> dict[str, tuple[str, Parameter]]:
        """config.pbtxt name -> (field name, declaration), in field order."""
        return {f.metadata[_PARAMETER].name: (f.name, f.metadata[_PARAMETER])
                for f in fields(cls) if _PARAMETER in f.metadata}

    @classmethod
    def parse(cls, parameters: Mapping[str, str]) -> dict[str, Any]:
        """Field values from the config.pbtxt strings of the parameters this class declares
        (others are skipped), each checked: ``ValueError`` naming the parameter if bad."""
        values: dict[str, Any] = {}
        for name, (attribute, declared) in cls.parameters().items():
            if name not in parameters:
                continue
            raw = parameters[name]
            try:
                value = declared.parse(raw.strip())
                violation = declared.violation(value)
                if violation:
                    raise ValueError(violation)
            except ValueError as exc:
                raise ValueError(f"parameter {name}={raw!r}: {exc}") from exc
            values[attribute] = value
        cls(**values)  # checks that span fields, if a subclass adds any
        return values

    @classmethod
    def from_mapping(cls: type[_Options], options: Mapping[str, Any],
                     policy: str = "") -> _Options:
        """The options named in ``options`` (``SchedulerConfig.options``), defaults for
        the rest; ``ValueError`` on a name this class does not have or a bad value."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"policy {policy or cls.__name__!r} has no option(s) {', '.join(unknown)}; "
                f"its options: {', '.join(known) or 'none'}")
        return cls(**options)


__all__ = [
    "Check",
    "Parameter",
    "PolicyOptions",
    "at_least",
    "fraction",
    "milliseconds",
    "parameter",
    "positive",
]
