"""config.pbtxt parameters -> frozen config dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from preemptserve.config import (
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    ServingConfig,
    parameter_names,
    serving_config_from_parameters,
)
from preemptserve.pbtxt import parse_parameters, read_parameters, set_parameters

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_CONFIG_PBTXT = REPO_ROOT / "model_repository" / "llm" / "config.pbtxt"

def test_no_parameters_gives_defaults() -> None:
    assert serving_config_from_parameters({}) == ServingConfig()


def test_every_name_maps_to_its_field() -> None:
    config = serving_config_from_parameters(
        {
            "model_dir": "/models/llama",
            "device": "cuda:1",
            "dtype": "bfloat16",
            "max_model_len": "1024",
            "scheduler_policy": "fcfs",
            "max_batch_size": "4",
            "max_num_tokens": "256",
            "kv_cache_bytes": "1048576",
            "kv_block_size": "32",
            "cancellation_check_period_ms": "10",
            "exclude_input_in_output": "true",
        }
    )
    assert config == ServingConfig(
        engine=EngineConfig(
            model_dir="/models/llama",
            device="cuda:1",
            dtype="bfloat16",
            max_model_len=1024,
            scheduler=SchedulerConfig(policy="fcfs", max_batch_size=4, max_num_batched_tokens=256),
            cache=CacheConfig(kv_cache_bytes=1048576, block_size=32),
        ),
        cancellation_check_period_ms=10,
        exclude_input_in_output=True,
    )


def test_parameter_names_are_the_accepted_ones() -> None:
    names = parameter_names()
    assert names == sorted(names)
    assert {"max_num_tokens", "kv_block_size", "scheduler_policy"} <= set(names)


@pytest.mark.parametrize("value", ["", "   ", "${max_batch_size}"])
def test_empty_or_unfilled_template_keeps_default(value: str) -> None:
    config = serving_config_from_parameters({name: value for name in parameter_names()})
    assert config == ServingConfig()


def test_values_are_stripped() -> None:
    config = serving_config_from_parameters({"max_batch_size": " 3 "})
    assert config.engine.scheduler.max_batch_size == 3


@pytest.mark.parametrize(
    "text, expected",
    [("1", True), ("true", True), ("Yes", True), ("ON", True),
     ("0", False), ("false", False), ("no", False), ("off", False)],
)
def test_boolean_spellings(text: str, expected: bool) -> None:
    config = serving_config_from_parameters({"exclude_input_in_output": text})
    assert config.exclude_input_in_output is expected


def test_config_is_frozen() -> None:
    config = serving_config_from_parameters({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.engine.scheduler.max_batch_size = 2  # type: ignore[misc]


def test_unknown_name_is_rejected_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="max_num_tokens") as info:
        serving_config_from_parameters({"max_num_tokenz": "8"})
    assert "'max_num_tokenz'" in str(info.value)


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_batch_size", "many"),
        ("max_batch_size", "0"),
        ("max_batch_size", "-3"),
        ("max_num_tokens", "1.5"),
        ("max_num_tokens", "0"),
        ("kv_cache_bytes", "256MB"),
        ("kv_cache_bytes", "0"),
        ("kv_block_size", "0"),
        ("max_model_len", "0"),
        ("max_model_len", "x"),
        ("dtype", "float64"),
        ("cancellation_check_period_ms", "soon"),
        ("exclude_input_in_output", "maybe"),
        ("max_queue_size", "-1"),
        ("max_queue_size", "1.5"),
    ],
)
def test_bad_value_names_the_parameter(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        serving_config_from_parameters({name: value})


@pytest.mark.parametrize("value", ["0", "-50"])
def test_non_positive_cancellation_period_is_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="cancellation_check_period_ms"):
        serving_config_from_parameters({"cancellation_check_period_ms": value})


def test_pbtxt_reads_parameters() -> None:
    text = """
    name: "llm"
    # parameters { key: "commented_out" value: { string_value: "x" } }
    parameters { key: "max_batch_size" value: { string_value: "8" } }
    parameters {
      key: "max_model_len"
      value: { string_value: "" }
    }
    parameters { key: "model_dir" value { string_value: 'a "quoted" # path' } }
    """
    assert parse_parameters(text) == {
        "max_batch_size": "8", "max_model_len": "", "model_dir": 'a "quoted" # path'}


def test_pbtxt_rejects_what_triton_would() -> None:
    with pytest.raises(ValueError, match="bad.pbtxt is not a valid model config"):
        parse_parameters('parameters { key: "x" value: { string_valu: "1" } }', "bad.pbtxt")


def test_pbtxt_parameters_are_replaced_or_added_and_the_rest_is_kept() -> None:
    text = MODEL_CONFIG_PBTXT.read_text()
    before = parse_parameters(text)
    assert "not_shipped" not in before
    changes = {"max_batch_size": "4", "model_dir": 'C:\\models\\"x"', "not_shipped": "1"}
    written = set_parameters(text, changes)
    assert parse_parameters(written) == {**before, **changes}
    original = text_format.Parse(text, model_config_pb2.ModelConfig())
    changed = text_format.Parse(written, model_config_pb2.ModelConfig())
    changed.ClearField("parameters")
    original.ClearField("parameters")
    assert changed == original  # inputs, outputs, decoupled policy, instance groups


def test_shipped_config_pbtxt_is_accepted() -> None:
    parameters = read_parameters(MODEL_CONFIG_PBTXT)
    assert parameters, f"no parameters found in {MODEL_CONFIG_PBTXT}"
    for name in parameters:
        assert name in parameter_names(), f"{name} in config.pbtxt is not a known parameter"
        serving_config_from_parameters({name: parameters[name]})
    config = serving_config_from_parameters(parameters)
    assert config.engine.scheduler.policy == parameters["scheduler_policy"]
    assert config.engine.cache.block_size == int(parameters["kv_block_size"])
    assert config.engine.scheduler.max_num_batched_tokens == int(parameters["max_num_tokens"])


def test_shipped_policy_is_registered() -> None:
    from preemptserve.core.scheduler import available_policies

    parameters = read_parameters(MODEL_CONFIG_PBTXT)
    assert parameters["scheduler_policy"] in available_policies()


def test_hidden_cache_can_be_disabled() -> None:
    assert serving_config_from_parameters({}).engine.cache.enable_hidden_cache
    config = serving_config_from_parameters({"enable_hidden_cache": "false"})
    assert not config.engine.cache.enable_hidden_cache


def test_max_queue_size_defaults_to_unbounded() -> None:
    assert serving_config_from_parameters({}).max_queue_size == 0
    assert serving_config_from_parameters({"max_queue_size": ""}).max_queue_size == 0
    assert serving_config_from_parameters({"max_queue_size": "16"}).max_queue_size == 16


def test_negative_max_queue_size_is_rejected_with_its_name() -> None:
    with pytest.raises(ValueError, match=r"max_queue_size must be >= 0 \(0: unbounded\), got -4"):
        serving_config_from_parameters({"max_queue_size": "-4"})
    with pytest.raises(ValueError, match="max_queue_size"):
        ServingConfig(max_queue_size=-1)
