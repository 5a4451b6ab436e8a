"""The ``tensorrt_llm_bls`` model: text in, text out, through BLS calls.

As tensorrtllm_backend's BLS model (commit c2e65b88): ``preprocessing`` tokenizes,
``tensorrt_llm`` (the engine) generates, ``postprocessing`` decodes, each a Triton call
from here. Differences, all in the client's favour: each request runs on its own thread
(one instance serves many requests at once, the official one serves one at a time per
instance), ``num_return_sequences`` reaches ``tensorrt_llm`` (the official one drops it),
and a streamed sequence's text is decoded from all its tokens so far, so chunks never
split a character or lose a word's leading space. Text-level stop words as the official
one: the text ends right after the first stop word, which is kept.
"""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from preemptserve.serving.protocol import (
    SCHEDULING_PARAMETERS,
    InvalidRequest,
    check_parameters,
)
from preemptserve.serving.trtllm_text import SequenceText, parse_flag

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

# BLS input -> preprocessing input.
PREPROCESSING_INPUTS = {
    "text_input": "QUERY", "decoder_text_input": "DECODER_QUERY",
    "image_bytes_input": "IMAGE_BYTES", "image_url_input": "IMAGE_URL",
    "video_bytes_input": "VIDEO_BYTES", "max_tokens": "REQUEST_OUTPUT_LEN",
    "bad_words": "BAD_WORDS_DICT", "stop_words": "STOP_WORDS_DICT",
    "embedding_bias_words": "EMBEDDING_BIAS_WORDS",
    "embedding_bias_weights": "EMBEDDING_BIAS_WEIGHTS", "pad_id": "PAD_ID",
    "end_id": "END_ID", "prompt_table_extra_id": "PROMPT_TABLE_EXTRA_ID",
}
# Preprocessing output -> tensorrt_llm input.
TOKEN_INPUTS = {
    "INPUT_ID": "input_ids", "REQUEST_INPUT_LEN": "input_lengths",
    "DECODER_INPUT_ID": "decoder_input_ids", "REQUEST_DECODER_INPUT_LEN":
    "decoder_input_lengths", "BAD_WORDS_IDS": "bad_words_list",
    "STOP_WORDS_IDS": "stop_words_list", "EMBEDDING_BIAS": "embedding_bias",
    "OUT_END_ID": "end_id", "OUT_PAD_ID": "pad_id", "REQUEST_OUTPUT_LEN": "request_output_len",
}
# BLS input -> tensorrt_llm input.
GENERATION_INPUTS = {
    "beam_width": "beam_width", "top_k": "runtime_top_k", "top_p": "runtime_top_p",
    "temperature": "temperature", "length_penalty": "len_penalty",
    "repetition_penalty": "repetition_penalty", "min_tokens": "min_tokens",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "seed": "seed", "return_log_probs": "return_log_probs", "stream": "streaming",
    "return_context_logits": "return_context_logits",
    "return_generation_logits": "return_generation_logits",
    "num_return_sequences": "num_return_sequences",
    "prompt_embedding_table": "prompt_embedding_table",
    "prompt_vocab_size": "prompt_vocab_size", "lora_task_id": "lora_task_id",
    "lora_weights": "lora_weights", "lora_config": "lora_config",
    "exclude_input_in_output": "exclude_input_in_output",
    "return_perf_metrics": "return_perf_metrics",
    "guided_decoding_guide_type": "guided_decoding_guide_type",
    "guided_decoding_guide": "guided_decoding_guide",
}
# Inputs of the BLS model alone that are not implemented.
REJECTED = {
    "image_input": "multimodal models are not supported",
    "num_draft_tokens": "speculative decoding (a draft model) is not supported",
    "use_draft_logits": "speculative decoding (a draft model) is not supported",
}
# tensorrt_llm outputs passed on as they are.
PASSED_OUTPUTS = (
    "cum_log_probs", "output_log_probs", "context_logits", "generation_logits",
    "batch_index", "sequence_index", "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks",
    "kv_cache_alloc_total_blocks", "arrival_time_ns", "first_scheduled_time_ns",
    "first_token_time_ns", "last_token_time_ns", "acceptance_rate",
    "total_accepted_draft_tokens", "total_draft_tokens",
)
ALL_INPUTS = (*PREPROCESSING_INPUTS, *GENERATION_INPUTS, *REJECTED)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {name: value.get("string_value", "")
                      for name, value in config.get("parameters", {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.accumulate = parse_flag(parameters.get("accumulate_tokens") or "false",
                                     "accumulate_tokens")
        self.llm_model_name = parameters.get("tensorrt_llm_model_name") or "tensorrt_llm"
        for name in ("tensorrt_llm_draft_model_name", "multimodal_encoders_name"):
            if parameters.get(name):
                raise pb_utils.TritonModelException(
                    f"parameter {name}: draft models and multimodal encoders are not "
                    "supported; leave it empty")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            threading.Thread(target=self._serve, args=(request, sender), daemon=True,
                             name="bls-request").start()
        return None

    # -- one request, on its own thread ------------------------------------------------

    def _serve(self, request, sender) -> None:
        try:
            _BlsRequest(self, request, sender).run()
        except Exception as exc:  # the client gets the reason; the model goes on
            message = str(exc) if isinstance(exc, (InvalidRequest, pb_utils.TritonModelException)) \
                else f"{type(exc).__name__}: {exc}"
            sender.send(pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(message)), flags=FINAL)


class _BlsRequest:
    def __init__(self, model: TritonPythonModel, request, sender) -> None:
        self.model = model
        self.sender = sender
        self.inputs = {}
        for name in ALL_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                self.inputs[name] = tensor.as_numpy()
        self.parameters = _parameters(request)
        self.request_id = request.request_id() or uuid.uuid4().hex
        self.is_cancelled = sender.is_cancelled

    def run(self) -> None:
        check_parameters(self.parameters, SCHEDULING_PARAMETERS)
        for name, reason in REJECTED.items():
            value = self.inputs.get(name)
            if value is not None and value.size and (name == "image_input" or value.any()):
                raise InvalidRequest(f"input '{name}' is not supported: {reason}")
        tokens = self._preprocess()
        streaming = bool(self._flag("stream"))
        exclude_input = bool(self._flag("exclude_input_in_output"))
        texts: dict[tuple[int, int], SequenceText] = {}
        token_counts: dict[tuple[int, int], list[int]] = {}
        held = None  # not streaming: the previous response, sent once another comes
        for response in self._generate(tokens):
            if self.is_cancelled():
                self._stop()
            arrays = _outputs(response)
            if "output_ids" not in arrays:
                continue  # the empty final response of a decoupled call
            key = (_index(arrays, "batch_index"), _index(arrays, "sequence_index"))
            text = texts.get(key)
            if text is None:
                text = texts[key] = self._sequence_text(key[0], streaming, exclude_input)
                token_counts[key] = []
            if text.stopped:
                continue
            token_counts[key].extend(arrays["output_ids"][0, 0].tolist())
            ids = token_counts[key] if streaming else arrays["output_ids"][0, 0].tolist()
            new_text = text.update(self._decode(ids))
            if text.stopped and all(t.stopped for t in texts.values()):
                self._stop()
            out = self._response(new_text, arrays)
            if streaming:
                self.sender.send(out)
            else:
                if held is not None:
                    self.sender.send(held)
                held = out
        if held is not None:
            self.sender.send(held, flags=FINAL)
        else:
            self.sender.send(flags=FINAL)

    def _flag(self, name: str):
        value = self.inputs.get(name)
        return None if value is None or not value.size else value.reshape(-1)[0]

    def _sequence_text(self, batch_index: int, streaming: bool,
                       exclude_input: bool) -> SequenceText:
        stop_words = self.inputs.get("stop_words")
        words = []
        if stop_words is not None and stop_words.size:
            row = stop_words[batch_index] if stop_words.ndim > 1 and \
                stop_words.shape[0] > batch_index else stop_words.reshape(-1)
            words = [w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in row]
        start = 0
        if not streaming and not exclude_input:
            prompt = self.inputs["text_input"].reshape(-1)[batch_index]
            start = len(prompt.decode("utf-8") if isinstance(prompt, bytes) else prompt)
        return SequenceText(words, start, accumulate=self.model.accumulate and streaming)

    def _preprocess(self) -> dict[str, np.ndarray]:
        if "text_input" not in self.inputs or "max_tokens" not in self.inputs:
            raise InvalidRequest("inputs 'text_input' and 'max_tokens' are required")
        tensors = [pb_utils.Tensor(PREPROCESSING_INPUTS[name], _as_batch(value, name))
                   for name, value in self.inputs.items() if name in PREPROCESSING_INPUTS]
        response = pb_utils.InferenceRequest(
            model_name="preprocessing", inputs=tensors, request_id=self.request_id,
            requested_output_names=list(TOKEN_INPUTS)).exec()
        if response.has_error():
            raise InvalidRequest(response.error().message())
        return {name: value for name, value in _outputs(response).items() if value.size}

    def _generate(self, tokens: dict[str, np.ndarray]):
        tensors = [pb_utils.Tensor(TOKEN_INPUTS[name], value)
                   for name, value in tokens.items() if name in TOKEN_INPUTS]
        tensors += [pb_utils.Tensor(GENERATION_INPUTS[name], _as_batch(value, name))
                    for name, value in self.inputs.items() if name in GENERATION_INPUTS]
        request = pb_utils.InferenceRequest(
            model_name=self.model.llm_model_name, inputs=tensors, request_id=self.request_id,
            requested_output_names=["output_ids", "sequence_length", *PASSED_OUTPUTS],
            parameters={k: v if isinstance(v, (bool, int, str)) else str(v)
                        for k, v in self.parameters.items()})
        if not self.model.decoupled:
            responses = [request.exec()]
        else:
            responses = request.exec(decoupled=True)
        for response in responses:
            if response.has_error():
                raise InvalidRequest(response.error().message())
            yield response

    def _stop(self) -> None:
        """End the generation (all stop words met, or the client left): TensorRT-LLM's
        stop request, by request id."""
        tensors = [pb_utils.Tensor("input_ids", np.zeros((1, 1), np.int32)),
                   pb_utils.Tensor("input_lengths", np.ones((1, 1), np.int32)),
                   pb_utils.Tensor("request_output_len", np.ones((1, 1), np.int32)),
                   pb_utils.Tensor("stop", np.array([[True]]))]
        request = pb_utils.InferenceRequest(
            model_name=self.model.llm_model_name, inputs=tensors, request_id=self.request_id,
            requested_output_names=[])
        responses = request.exec(decoupled=True) if self.model.decoupled else [request.exec()]
        for _ in responses:
            pass

    def _decode(self, ids: list[int]) -> str:
        tensors = [pb_utils.Tensor("TOKENS_BATCH", np.array(ids, np.int32).reshape(1, 1, -1)),
                   pb_utils.Tensor("SEQUENCE_LENGTH", np.array([[len(ids)]], np.int32))]
        response = pb_utils.InferenceRequest(
            model_name="postprocessing", inputs=tensors, request_id=self.request_id,
            requested_output_names=["OUTPUT"]).exec()
        if response.has_error():
            raise InvalidRequest(response.error().message())
        return _outputs(response)["OUTPUT"].reshape(-1)[0].decode("utf-8")

    @staticmethod
    def _response(text: str, arrays: dict[str, np.ndarray]):
        tensors = [pb_utils.Tensor("text_output",
                                   np.array([text.encode("utf-8")], dtype=np.object_))]
        tensors += [pb_utils.Tensor(name, arrays[name]) for name in PASSED_OUTPUTS
                    if name in arrays]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _outputs(response) -> dict[str, np.ndarray]:
    return {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}


def _index(arrays: dict[str, np.ndarray], name: str) -> int:
    value = arrays.get(name)
    return 0 if value is None else int(value.reshape(-1)[0])


def _as_batch(value: np.ndarray, name: str) -> np.ndarray:
    """A per-item scalar the config reshapes to ``[B]`` goes on as ``[B, 1]``."""
    return value.reshape(-1, 1) if value.ndim == 1 else value


def _parameters(request) -> dict:
    try:
        parameters = json.loads(request.parameters() or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request parameters are not valid JSON: {exc}") from exc
    return parameters if isinstance(parameters, dict) else {}
