"""Policy parameters: declared by each policy, routed from config.pbtxt by the registry."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import pytest

from preemptserve.config import SchedulerConfig, parameter_names, serving_config_from_parameters
from preemptserve.core.block_manager import BlockManager
from preemptserve.core.cost_model import PrefillProfile
from preemptserve.core.scheduler import create_scheduler, registry
from preemptserve.core.scheduler.apt import AptOptions
from preemptserve.core.scheduler.fcfs import FCFSScheduler
from preemptserve.core.scheduler.mlfq import MLFQOptions
from preemptserve.core.scheduler.parameters import (
    PolicyOptions,
    at_least,
    milliseconds,
    parameter,
)

PROFILE = PrefillProfile(((1, 0.001), (1024, 0.1)))


def scheduler_config(parameters: dict[str, str]) -> SchedulerConfig:
    return serving_config_from_parameters(parameters).engine.scheduler


def test_policy_parameters_are_read_into_the_chosen_policys_options() -> None:
    config = scheduler_config({
        "scheduler_policy": "skip_join_mlfq", "mlfq_base_quantum_ms": "20",
        "mlfq_num_queues": "3", "mlfq_starvation_threshold_ms": "1500",
        "kv_reserve_fraction": "0.1"})
    assert config.options == {"base_quantum_s": 0.02, "num_queues": 3,
                              "starvation_threshold_s": 1.5, "kv_reserve_fraction": 0.1}
    scheduler = create_scheduler(config, BlockManager(100, 4), cost_model=PROFILE)
    assert scheduler.options == MLFQOptions(base_quantum_s=0.02, num_queues=3,
                                            starvation_threshold_s=1.5,
                                            kv_reserve_fraction=0.1)
    assert scheduler.quanta_s == pytest.approx([0.02, 0.04, 0.08])  # type: ignore[attr-defined]
    assert scheduler.reserve_blocks == 10  # type: ignore[attr-defined]


def test_defaults_are_the_options_classes() -> None:
    assert scheduler_config({"scheduler_policy": "apt"}).options == {}
    scheduler = create_scheduler(SchedulerConfig(policy="skip_join_mlfq"), BlockManager(8, 4),
                                 cost_model=PROFILE)
    assert scheduler.options == MLFQOptions()
    assert (MLFQOptions().base_quantum_s, AptOptions().ttft_slo_s) == (0.05, 2.0)


def test_unknown_parameter_fails_naming_it_and_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown parameter 'mlfq_num_queue'") as info:
        serving_config_from_parameters({"mlfq_num_queue": "4"})
    known = str(info.value).split("known: ")[1].split(", ")
    assert known == parameter_names()
    assert {"max_num_tokens", "mlfq_num_queues", "kv_reserve_fraction", "ttft_slo_ms"} <= set(
        known)


@pytest.mark.parametrize("policy", ["skip_join_mlfq", "apt", "fcfs"])
@pytest.mark.parametrize(
    "name, value, message",
    [
        ("mlfq_base_quantum_ms", "0", "must be positive"),
        ("mlfq_base_quantum_ms", "fast", "could not convert"),
        ("mlfq_quantum_ratio", "0.5", "must be >= 1"),
        ("mlfq_num_queues", "0", "must be >= 1"),
        ("mlfq_num_queues", "2.5", "invalid literal"),
        ("mlfq_starvation_threshold_ms", "-1", "must be positive"),
        ("mlfq_max_started_factor", "0.5", "must be >= 1"),
        ("kv_reserve_fraction", "1", r"must be in \[0, 1\)"),
        ("kv_reserve_fraction", "-0.1", r"must be in \[0, 1\)"),
        ("ttft_slo_ms", "0", "must be positive"),
        ("tbt_slo_ms", "-5", "must be positive"),
    ],
)
def test_bad_policy_value_fails_naming_the_parameter_whatever_the_policy(
        policy: str, name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^parameter {name}='{value}': {message}"):
        serving_config_from_parameters({"scheduler_policy": policy, name: value})


def test_parameters_of_other_policies_are_accepted_and_ignored() -> None:
    """One config.pbtxt may configure every policy (the shipped one does)."""
    parameters = {"mlfq_num_queues": "3", "kv_reserve_fraction": "0.2", "ttft_slo_ms": "100"}
    assert scheduler_config({**parameters, "scheduler_policy": "fcfs"}).options == {}
    assert scheduler_config({**parameters, "scheduler_policy": "apt"}).options == {
        "ttft_slo_s": 0.1}
    assert scheduler_config({**parameters, "scheduler_policy": "skip_join_mlfq"}).options == {
        "num_queues": 3, "kv_reserve_fraction": 0.2}


def test_empty_policy_values_keep_the_defaults() -> None:
    config = scheduler_config({"scheduler_policy": "skip_join_mlfq", "mlfq_num_queues": "",
                               "mlfq_base_quantum_ms": "${quantum}"})
    assert config.options == {}


def test_unknown_policy_fails_the_load() -> None:
    with pytest.raises(ValueError, match="scheduler_policy='nope': unknown scheduler policy"):
        serving_config_from_parameters({"scheduler_policy": "nope"})


def test_options_set_in_python_are_checked_by_the_policy() -> None:
    bm = BlockManager(8, 4)
    with pytest.raises(ValueError, match="mlfq_num_queues must be >= 1, got num_queues=0"):
        create_scheduler(SchedulerConfig(policy="skip_join_mlfq", options={"num_queues": 0}),
                         bm, cost_model=PROFILE)
    with pytest.raises(ValueError, match="'skip_join_mlfq' has no option.*num_queue;"):
        create_scheduler(SchedulerConfig(policy="skip_join_mlfq", options={"num_queue": 2}),
                         bm, cost_model=PROFILE)
    with pytest.raises(ValueError, match="'fcfs' has no option.*ttft_slo_s; its options: none"):
        FCFSScheduler(SchedulerConfig(policy="fcfs", options={"ttft_slo_s": 1.0}), bm)


def test_scheduler_config_stays_frozen_hashable_and_picklable() -> None:
    config = SchedulerConfig(policy="apt", options={"ttft_slo_s": 1.0})
    with pytest.raises(TypeError):
        config.options["ttft_slo_s"] = 2.0  # type: ignore[index]
    assert config == SchedulerConfig(policy="apt", options={"ttft_slo_s": 1.0})
    assert hash(config) == hash(SchedulerConfig(policy="apt", options={"ttft_slo_s": 1.0}))
    assert pickle.loads(pickle.dumps(config)) == config == copy.deepcopy(config)
    assert SchedulerConfig(policy="apt") != config


@dataclass(frozen=True)
class _WindowOptions(PolicyOptions):
    window_s: float = parameter("window_ms", 0.25, milliseconds, doc="how far back to look")
    depth: int = parameter("window_depth", 2, int, at_least(1), "levels kept")


@pytest.fixture
def window_policy(monkeypatch: pytest.MonkeyPatch) -> type[FCFSScheduler]:
    """A policy added at run time (as a new file under core/scheduler would be)."""
    monkeypatch.setattr(registry, "_POLICIES", dict(registry._POLICIES))

    @registry.register_policy("test_window")
    class WindowScheduler(FCFSScheduler):
        options_class = _WindowOptions

    return WindowScheduler


def test_a_new_policy_is_configured_from_its_own_parameters(window_policy) -> None:
    assert {"window_ms", "window_depth"} <= set(parameter_names())
    config = scheduler_config({"scheduler_policy": "test_window", "window_ms": "500",
                               "mlfq_num_queues": "3", "max_batch_size": "4"})
    assert config.options == {"window_s": 0.5}
    scheduler = create_scheduler(config, BlockManager(8, 4))
    assert isinstance(scheduler, window_policy)
    assert scheduler.options == _WindowOptions(window_s=0.5, depth=2)
    with pytest.raises(ValueError, match="^parameter window_depth='0': must be >= 1"):
        serving_config_from_parameters({"scheduler_policy": "fcfs", "window_depth": "0"})
    # Its parameters are another policy's to the built-in ones.
    assert scheduler_config({"scheduler_policy": "apt", "window_ms": "500"}).options == {}


def test_a_policy_removed_from_the_registry_takes_its_parameters(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_POLICIES", {"fcfs": FCFSScheduler})
    with pytest.raises(ValueError, match="unknown parameter 'mlfq_num_queues'"):
        serving_config_from_parameters({"mlfq_num_queues": "3"})


def test_a_policy_cannot_declare_a_parameter_the_engine_owns(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_POLICIES", dict(registry._POLICIES))

    @dataclass(frozen=True)
    class _Clashing(PolicyOptions):
        size: int = parameter("max_batch_size", 4, int)

    class ClashingScheduler(FCFSScheduler):
        options_class = _Clashing

    with pytest.raises(ValueError, match="parameters the engine owns: \\['max_batch_size'\\]"):
        registry.register_policy("test_clash")(ClashingScheduler)
