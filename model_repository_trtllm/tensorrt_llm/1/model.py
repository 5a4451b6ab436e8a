"""The ``tensorrt_llm`` model: token ids in, token ids out, TensorRT-LLM backend's contract.

It owns the server's one engine (and its scheduling policy); ``ensemble`` and
``tensorrt_llm_bls`` reach it through Triton. ``execute`` validates, splits a request
into its sequences (batch items x ``num_return_sequences``) and submits them to the
engine loop; each sequence's outputs become responses in ``serving/trtllm_response.py``.
Works decoupled (streaming, one response per sequence) or not (one response per request).
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import replace

import torch
import triton_python_backend_utils as pb_utils

import preemptserve
from preemptserve.config import serving_config_from_parameters
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.serving.engine_loop import EngineLoop, QueueFullError
from preemptserve.serving.protocol import InvalidRequest
from preemptserve.serving.triton_metrics import EngineMetrics
from preemptserve.serving.trtllm_request import (
    TENSORRT_LLM_INPUTS,
    TokenRequest,
    parse_token_request,
    sequence_seed,
)
from preemptserve.serving.trtllm_response import ResponseGroup

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(model_config)
        parameters = {name: value.get("string_value", "")
                      for name, value in model_config.get("parameters", {}).items()}
        self.config = serving_config_from_parameters(parameters)
        if self.config.cluster.num_instances > 1:
            raise pb_utils.TritonModelException(
                "num_instances > 1: the tensorrt_llm model serves one engine instance; "
                "model_repository/llm serves many")
        self.model_name = args["model_name"]
        engine = LLMEngine(self.config.engine)
        self.metrics = EngineMetrics(self.model_name, engine.get_stats())
        self.loop = EngineLoop.for_model(engine, self.config, self.metrics.update,
                                         self._on_engine_failure)
        self.loop.start()
        # Triton request id -> its groups still answering (a "stop" request ends them).
        self._groups: dict[str, set[ResponseGroup]] = {}
        self._lock = threading.Lock()
        self.logger.log_info(
            f"preemptserve ({preemptserve.__path__[0]}): tensorrt_llm model "
            f"{'decoupled' if self.decoupled else 'not decoupled'}, {engine.model_dir} on "
            f"{engine.device}, policy {self.config.engine.scheduler.policy}, "
            f"{engine.block_manager.num_blocks} KV blocks, {torch.get_num_threads()} threads")

    def _on_engine_failure(self, reason: str) -> None:
        """The engine cannot serve any more (a rank died): as model ``llm`` does."""
        self.logger.log_error(f"preemptserve: model unhealthy: {reason}")
        self.metrics.healthy.set(0)
        if self.config.unload_model_on_failure:
            threading.Thread(target=pb_utils.unload_model, args=(self.model_name,),
                             name="unload-unhealthy", daemon=True).start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            inputs = {}
            for name in TENSORRT_LLM_INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if tensor is None else tensor.as_numpy()
            try:
                parsed = parse_token_request(
                    inputs, default_exclude_input=self.config.exclude_input_in_output,
                    parameters=_request_parameters(request), decoupled=self.decoupled)
            except InvalidRequest as exc:
                sender.send(_error(str(exc)), flags=FINAL)
                continue
            if parsed.stop:
                self._stop(request.request_id())
                sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)
                continue
            self._start(request.request_id(), sender, parsed)
        return None

    def _start(self, triton_id: str, sender, parsed: TokenRequest) -> None:
        group: ResponseGroup

        def send(arrays, error, final):
            if error is not None:
                sender.send(_error(error), flags=FINAL)
            elif arrays is None:
                sender.send(flags=FINAL)
            else:
                tensors = [pb_utils.Tensor(name, array) for name, array in arrays.items()]
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors),
                            flags=FINAL if final else 0)
            if final:
                self._forget(triton_id, group)

        group = ResponseGroup(send, self.decoupled, self._cancel)
        sequences = []
        for item in parsed.items:
            for index in range(item.num_return_sequences):
                responder = group.add(item, index)
                responder.request_id = uuid.uuid4().hex
                sequences.append((item, index, responder))
        with self._lock:
            self._groups.setdefault(triton_id, set()).add(group)
        submitted = []
        try:
            first_id = ""
            for item, index, responder in sequences:
                sampling = item.sampling if index == 0 else replace(
                    item.sampling, seed=sequence_seed(item.sampling.seed, index))
                if index == 0:
                    first_id = responder.request_id
                self.loop.submit(item.prompt_ids, sampling, responder,
                                 is_cancelled=sender.is_cancelled,
                                 ttft_slo_s=parsed.ttft_slo_s, tbt_slo_s=parsed.tbt_slo_s,
                                 priority=parsed.priority, echo_prompt=False, stream=True,
                                 request_id=responder.request_id,
                                 return_perf_metrics=item.return_perf_metrics,
                                 # The item's other sequences share its first's prefill.
                                 fork_of=first_id if index else None)
                submitted.append(responder.request_id)
        except QueueFullError as exc:  # overloaded: refuse now rather than queue
            group.closed = True  # before the cancels: their outputs are not sent
            self._cancel(submitted)
            self.metrics.rejected_queue_full.increment(1)
            self._forget(triton_id, group)
            sender.send(_error(str(exc), pb_utils.TritonError.UNAVAILABLE), flags=FINAL)

    def _stop(self, triton_id: str) -> None:
        """TensorRT-LLM's stop request: end the requests with this id."""
        with self._lock:
            groups = list(self._groups.get(triton_id, ()))
        for group in groups:
            self._cancel([s.request_id for s in group.sequences if not s.finished])

    def _cancel(self, request_ids) -> None:
        for request_id in request_ids:
            self.loop.cancel(request_id)

    def _forget(self, triton_id: str, group: ResponseGroup) -> None:
        with self._lock:
            groups = self._groups.get(triton_id)
            if groups is not None:
                groups.discard(group)
                if not groups:
                    del self._groups[triton_id]

    def finalize(self):
        self.loop.shutdown()


def _error(message: str, code=None):
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _request_parameters(request) -> dict:
    try:
        parameters = json.loads(request.parameters() or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request parameters are not valid JSON: {exc}") from exc
    return parameters if isinstance(parameters, dict) else {}

