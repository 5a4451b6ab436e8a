"""``model_repository_trtllm/`` has the official contract: every model of tensorrtllm_backend's
``all_models/inflight_batcher_llm`` (commit c2e65b88, copied unchanged into
``tests/tensorrtllm_backend/``) with the same inputs and outputs: names, data types, dims,
reshapes, optional flags and a batch dimension; the ensemble's steps are the official ones.
Every input of ``tensorrt_llm`` is either implemented or rejected by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from preemptserve.serving.trtllm_request import IMPLEMENTED_INPUTS, REJECTED_INPUTS

ROOT = Path(__file__).resolve().parents[2]
OURS = ROOT / "model_repository_trtllm"
OFFICIAL = ROOT / "tests" / "tensorrtllm_backend" / "all_models" / "inflight_batcher_llm"
MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls")
# Values for the official templates' unquoted placeholders (fill_template.py's job);
# quoted ones become "".
UNQUOTED = {"triton_max_batch_size": "64", "decoupled_mode": "true",
            "logits_datatype": "TYPE_FP32", "encoder_input_features_data_type": "TYPE_FP16",
            "max_queue_delay_microseconds": "0", "max_queue_size": "0",
            "preprocessing_instance_count": "1", "postprocessing_instance_count": "1",
            "bls_instance_count": "1"}


def load(path: Path, template: bool = False) -> model_config_pb2.ModelConfig:
    text = path.read_text()
    if template:
        text = re.sub(r"\$\{(\w+)\}", lambda m: UNQUOTED.get(m.group(1), ""), text)
    assert "${" not in text, f"{path} has an unfilled placeholder"
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def tensors(config, field: str) -> dict[str, str]:
    """name -> the whole declaration (type, dims, reshape, optional, ragged, ...)."""
    return {t.name: text_format.MessageToString(t) for t in getattr(config, field)}


@pytest.mark.parametrize("model", MODELS)
def test_inputs_and_outputs_are_the_official_ones(model):
    ours = load(OURS / model / "config.pbtxt")
    official = load(OFFICIAL / model / "config.pbtxt", template=True)
    assert ours.name == official.name == model
    assert ours.max_batch_size > 0  # clients send [1, 1]-shaped tensors
    assert tensors(ours, "input") == tensors(official, "input")
    assert tensors(ours, "output") == tensors(official, "output")
    assert ours.platform == official.platform
    if model != "ensemble":
        assert ours.backend == "python"
        assert (OURS / model / "1" / "model.py").is_file()
    if model in ("tensorrt_llm", "tensorrt_llm_bls"):
        assert ours.model_transaction_policy.decoupled


def test_ensemble_steps_are_the_official_ones():
    ours = load(OURS / "ensemble" / "config.pbtxt")
    official = load(OFFICIAL / "ensemble" / "config.pbtxt", template=True)
    assert ours.ensemble_scheduling == official.ensemble_scheduling


def test_every_tensorrt_llm_input_is_implemented_or_rejected():
    official = {t.name for t in load(OFFICIAL / "tensorrt_llm" / "config.pbtxt",
                                     template=True).input}
    assert set(IMPLEMENTED_INPUTS) | set(REJECTED_INPUTS) == official
    assert not set(IMPLEMENTED_INPUTS) & set(REJECTED_INPUTS)


def test_the_engine_parameters_parse():
    from preemptserve.config import serving_config_from_parameters

    config = load(OURS / "tensorrt_llm" / "config.pbtxt")
    parameters = {name: value.string_value for name, value in config.parameters.items()}
    serving = serving_config_from_parameters(parameters)
    assert serving.exclude_input_in_output is False
