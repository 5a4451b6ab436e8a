"""The ``preprocessing`` model: prompts and word lists -> token tensors for ``tensorrt_llm``.

Names, formats and defaults of tensorrtllm_backend's model (commit c2e65b88); the work is
in ``serving/trtllm_text.py``. Multimodal, encoder-decoder and prompt-tuning inputs fail
with the reason. Request parameters are checked here, the ensemble's first step: an
unknown one (a misspelt generate-endpoint key) fails the request.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from preemptserve.serving.protocol import (
    SCHEDULING_PARAMETERS,
    InvalidRequest,
    check_parameters,
)
from preemptserve.serving.trtllm_request import STREAMING_PARAMETER
from preemptserve.serving.trtllm_text import (
    PREPROCESSING_INPUTS,
    TextCodec,
    check_preprocessing_inputs,
    parse_flag,
    resolve_tokenizer_dir,
)

ALLOWED_PARAMETERS = SCHEDULING_PARAMETERS | {STREAMING_PARAMETER}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {name: value.get("string_value", "")
                      for name, value in config.get("parameters", {}).items()}
        self.codec = TextCodec(
            resolve_tokenizer_dir(parameters.get("tokenizer_dir", "default")),
            add_special_tokens=parse_flag(parameters.get("add_special_tokens") or "true",
                                          "add_special_tokens"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._preprocess(request))
            except InvalidRequest as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses

    def _preprocess(self, request):
        inputs = {}
        for name in PREPROCESSING_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            inputs[name] = None if tensor is None else tensor.as_numpy()
        check_parameters(_parameters(request), ALLOWED_PARAMETERS)
        check_preprocessing_inputs(inputs)
        query = inputs["QUERY"]
        size = query.shape[0]
        codec = self.codec
        input_ids, input_lengths = codec.encode_queries(query)
        outputs = {
            "INPUT_ID": input_ids,
            "REQUEST_INPUT_LEN": input_lengths,
            # No decoder input, as the official model says it: one pad token per item
            # (tensorrt_llm refuses a longer one: encoder-decoder models are not served).
            "DECODER_INPUT_ID": np.full((size, 1), codec.pad_id, dtype=np.int32),
            "REQUEST_DECODER_INPUT_LEN": np.ones((size, 1), dtype=np.int32),
            "REQUEST_OUTPUT_LEN": inputs["REQUEST_OUTPUT_LEN"],
            "BAD_WORDS_IDS": codec.word_lists(inputs["BAD_WORDS_DICT"], size, "BAD_WORDS_DICT"),
            "STOP_WORDS_IDS": codec.word_lists(inputs["STOP_WORDS_DICT"], size,
                                               "STOP_WORDS_DICT"),
            "EMBEDDING_BIAS": codec.embedding_bias(inputs["EMBEDDING_BIAS_WORDS"],
                                                   inputs["EMBEDDING_BIAS_WEIGHTS"], size),
            "OUT_END_ID": codec.special_ids(inputs["END_ID"], codec.end_id, size, "END_ID"),
            "OUT_PAD_ID": codec.special_ids(inputs["PAD_ID"], codec.pad_id, size, "PAD_ID"),
        }
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()])


def _parameters(request) -> dict:
    try:
        parameters = json.loads(request.parameters() or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request parameters are not valid JSON: {exc}") from exc
    return parameters if isinstance(parameters, dict) else {}
