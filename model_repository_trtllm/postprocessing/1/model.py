"""The ``postprocessing`` model: token ids -> text, as tensorrtllm_backend's (c2e65b88).

Each response of ``tensorrt_llm`` is decoded on its own (the ensemble keeps no state
between them); ``tensorrt_llm`` streams chunks that end on character boundaries, so no
chunk holds half a multi-byte character.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from preemptserve.serving.protocol import InvalidRequest
from preemptserve.serving.trtllm_text import TextCodec, parse_flag, resolve_tokenizer_dir


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {name: value.get("string_value", "")
                      for name, value in config.get("parameters", {}).items()}
        self.codec = TextCodec(
            resolve_tokenizer_dir(parameters.get("tokenizer_dir", "default")),
            skip_special_tokens=parse_flag(parameters.get("skip_special_tokens") or "true",
                                           "skip_special_tokens"))

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            try:
                text = self.codec.decode(tokens, lengths)
            except (InvalidRequest, ValueError) as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(exc))))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("OUTPUT", text)]))
        return responses
