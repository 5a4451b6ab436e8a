"""Triton Python-backend adapter: requests in, per-token responses out.

``execute`` only validates and enqueues; ``EngineLoop`` runs the engine on its own thread
and calls back here to send responses through each request's response sender.
"""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

import preemptserve
from preemptserve.cluster.stats import DOWNTIME_BUCKETS_S
from preemptserve.config import serving_config_from_parameters
from preemptserve.engine.llm_engine import LLMEngine
from preemptserve.engine.outputs import EngineStats, RequestOutput
from preemptserve.serving.engine_loop import EngineLoop, QueueFullError
from preemptserve.serving.protocol import INPUT_NAMES, InvalidRequest, parse_generate_request
from preemptserve.serving.triton_metrics import EngineMetrics as _Metrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        auto_complete_model_config.set_max_batch_size(0)
        return auto_complete_model_config

    def initialize(self, args):
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("this model must be decoupled")
        parameters = {
            name: value.get("string_value", "")
            for name, value in model_config.get("parameters", {}).items()
        }
        self.config = serving_config_from_parameters(parameters)
        self.model_name = args["model_name"]
        self.cluster = None
        if self.config.cluster.num_instances > 1 or self.config.cluster.enable_scaling:
            self._start_cluster()
            return
        engine = LLMEngine(self.config.engine)
        self.metrics = _Metrics(self.model_name, engine.get_stats())
        # Metrics and health are calls into the server: made on the response sender thread.
        self.loop = EngineLoop.for_model(engine, self.config, self.metrics.update,
                                         self._on_engine_failure)
        self.loop.start()
        self.logger.log_info(
            f"preemptserve ({preemptserve.__path__[0]}): model {engine.model_dir} on "
            f"{engine.device}, tensor_parallel_size {engine.tensor_parallel_size}, "
            f"policy {self.config.engine.scheduler.policy}, "
            f"{engine.block_manager.num_blocks} KV blocks, "
            f"{torch.get_num_threads()} torch threads, "
            f"max_queue_size {self.config.max_queue_size or 'unbounded'}"
        )

    def _start_cluster(self) -> None:
        """Many engine instances (Ray actors) behind this model: ``cluster/``. Ray starts
        here, in the stub's main thread, as it must."""
        from preemptserve.cluster.frontend import ClusterFrontend
        from preemptserve.cluster.ray_cluster import RayCluster
        from preemptserve.engine.llm_engine import resolve_model_dir
        from preemptserve.engine.tokenizer import TextTokenizer

        config = self.config
        self.cluster = RayCluster(config.cluster, config.engine, name=self.model_name,
                                  iteration_stats_path=config.iteration_stats_path)
        tokenizer = TextTokenizer(resolve_model_dir(config.engine.model_dir))
        block_size = config.engine.cache.block_size

        def prompt_blocks(prompt: str) -> int:
            return -(-(len(tokenizer.encode(prompt)) + 1) // block_size)

        stats = EngineStats(num_blocks_total=sum(i["num_blocks"] for i in self.cluster.infos))
        self.metrics = _Metrics(self.model_name, stats)
        self.cluster_metrics = _ClusterMetrics(self.model_name)
        self.loop = ClusterFrontend(
            self.cluster, config.cluster, prompt_blocks=prompt_blocks,
            cancellation_check_period_s=config.cancellation_check_period_ms / 1000,
            on_stats=self._on_cluster_stats, on_failure=self._on_engine_failure,
            max_queue_size=config.max_queue_size,
        )
        self.loop.start()
        instances = ", ".join(f"{i['instance_id']}: pid {i['pid']} on {i['device']}, "
                              f"{i['num_blocks']} KV blocks" for i in self.cluster.infos)
        self.logger.log_info(
            f"preemptserve ({preemptserve.__path__[0]}): model {config.engine.model_dir}, "
            f"{self.cluster.num_instances} engine instances ({instances}), "
            f"policy {config.engine.scheduler.policy}, dispatch {config.cluster.dispatch_policy}"
            f", migration {'on' if config.cluster.enable_migration else 'off'}"
            + (f", auto-scaling {config.cluster.min_instances}.."
               f"{config.cluster.scaling_max_instances} instances"
               if config.cluster.enable_scaling else ""))

    def _on_cluster_stats(self, stats: EngineStats) -> None:
        self.metrics.update(stats)
        self.cluster_metrics.update(self.loop.stats)

    def _on_engine_failure(self, reason: str) -> None:
        """The engine cannot serve any more (a rank died): say so, and leave if allowed.

        Requests in flight already got an error and new ones get one at once. Triton 24.10
        lets a Python model change its readiness only by being unloaded, which the server
        allows under ``--model-control-mode=explicit`` only: with ``unload_model_on_failure``
        the model unloads itself and ``/v2/models/<name>/ready`` turns false. (Off by
        default: in the other modes 24.10 refuses, and its Python backend sometimes
        aborted the server after that refused call.)
        """
        self.logger.log_error(f"preemptserve: model unhealthy: {reason}")
        self.metrics.healthy.set(0)
        if not self.config.unload_model_on_failure:
            return

        def unload() -> None:
            try:
                pb_utils.unload_model(self.model_name)
            except Exception as exc:
                self.logger.log_error(f"preemptserve: could not unload the model: {exc}")

        threading.Thread(target=unload, name="unload-unhealthy", daemon=True).start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            inputs = {}
            for name in INPUT_NAMES:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if tensor is None else tensor.as_numpy()
            try:
                parsed = parse_generate_request(
                    inputs, default_exclude_input=self.config.exclude_input_in_output,
                    parameters=_request_parameters(request),
                )
            except InvalidRequest as exc:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                            flags=FINAL)
                continue
            try:
                self.loop.submit(parsed.prompt, parsed.sampling,
                                 _Responder(sender, parsed.stream),
                                 is_cancelled=sender.is_cancelled, ttft_slo_s=parsed.ttft_slo_s,
                                 tbt_slo_s=parsed.tbt_slo_s, priority=parsed.priority,
                                 # Like TensorRT-LLM and vLLM backends: the prompt leads
                                 # the text unless excluded.
                                 echo_prompt=not parsed.exclude_input_in_output,
                                 stream=parsed.stream)
            except QueueFullError as exc:  # overloaded: refuse now rather than queue
                self.metrics.rejected_queue_full.increment(1)
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
        return None

    def finalize(self):
        self.loop.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()


def _request_parameters(request) -> dict:
    """The request's Triton parameters (gRPC ``parameters``, HTTP ``"parameters"``)."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"request parameters are not valid JSON: {exc}") from exc
    return parameters if isinstance(parameters, dict) else {}


class _Responder:
    """Sends one request's engine outputs as Triton responses (the sender thread only).

    Holds no text: the engine shapes it (the prompt echoed, or all of it at the end for
    a non-streaming request).
    """

    def __init__(self, sender, stream: bool) -> None:
        self.sender = sender
        self.stream = stream

    def __call__(self, output: RequestOutput, error: str | None) -> None:
        if error is not None:
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)),
                             flags=FINAL)
        elif output.finish_reason == "abort":  # cancelled: close the stream, nothing more
            self.sender.send(flags=FINAL)
        elif self.stream or output.finished:
            self.sender.send(_text_response(output.text), flags=FINAL if output.finished else 0)


def _text_response(text: str):
    tensor = pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))
    return pb_utils.InferenceResponse(output_tensors=[tensor])


class _ClusterMetrics:
    """Metrics of a model with many engine instances: instances, their freeness, moves,
    auto-scaling actions."""

    def __init__(self, model_name: str) -> None:
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self._labels = {"model": model_name}
        instances = pb_utils.MetricFamily(
            name="preemptserve_instances", description="Engine instances by state",
            kind=gauge)
        self._freeness = pb_utils.MetricFamily(
            name="preemptserve_instance_freeness",
            description="Migration freeness of each instance (free decode steps per "
                        "request; Llumnix's load)", kind=gauge)
        self._migrations = pb_utils.MetricFamily(
            name="preemptserve_migrations_total",
            description="Live request migrations; status=started, committed, aborted_src "
                        "or aborted_dst (reason: why)", kind=counter)
        migration_bytes = pb_utils.MetricFamily(
            name="preemptserve_migration_bytes_total",
            description="KV bytes copied by migrations", kind=counter)
        self._downtime = pb_utils.MetricFamily(
            name="preemptserve_migration_downtime_seconds",
            description="Time a migrated request stood still (stop on the source to "
                        "import on the destination)", kind=pb_utils.MetricFamily.HISTOGRAM)
        self._scaling = pb_utils.MetricFamily(
            name="preemptserve_scaling_events_total",
            description="Auto-scaling actions; action=add (instances started), add_failed, "
                        "drain, undrain (a drain called off), stop (drained instances "
                        "stopped)", kind=counter)
        self.alive = instances.Metric(labels={**self._labels, "state": "alive"})
        self.starting = instances.Metric(labels={**self._labels, "state": "starting"})
        self.draining = instances.Metric(labels={**self._labels, "state": "draining"})
        self.total = instances.Metric(labels={**self._labels, "state": "total"})
        self.bytes = migration_bytes.Metric(labels=self._labels)
        self._started = self._migrations.Metric(labels={**self._labels, "status": "started",
                                                        "reason": ""})
        self._histogram = self._downtime.Metric(labels=self._labels,
                                                buckets=list(DOWNTIME_BUCKETS_S[:-1]))
        self._families = (instances, self._freeness, self._migrations, migration_bytes,
                          self._downtime, self._scaling)
        self._by_instance: dict[int, object] = {}
        self._ended: dict[tuple[str, str], object] = {}
        self._scaling_events: dict[str, object] = {}
        self._gone: set[int] = set()  # instances stopped: their freeness set to NaN
        self._last = {"started": 0, "bytes": 0, "ended": {}, "downtimes": 0, "scaling": {}}
        self._lock = threading.Lock()

    def update(self, stats) -> None:
        with self._lock:
            self._update(stats)

    def _update(self, stats) -> None:
        self.alive.set(stats.num_alive)
        self.starting.set(stats.num_starting)
        self.draining.set(stats.num_draining)
        self.total.set(stats.num_instances)
        freeness = dict(stats.freeness)
        # A stopped instance has no freeness: NaN, as the backend cannot delete a series
        # (its metric family keeps every metric it made). Numbers are never reused.
        for instance in set(self._by_instance) - set(freeness) - self._gone:
            self._by_instance[instance].set(math.nan)
            self._gone.add(instance)
        for instance, value in freeness.items():
            metric = self._by_instance.get(instance)
            if metric is None:
                metric = self._by_instance[instance] = self._freeness.Metric(
                    labels={**self._labels, "instance": str(instance)})
            metric.set(value if math.isfinite(value) else math.copysign(1e9, value))
        for action, count in list(stats.scaling_events.items()):
            seen = self._last["scaling"].get(action, 0)
            if count > seen:
                metric = self._scaling_events.get(action)
                if metric is None:
                    metric = self._scaling_events[action] = self._scaling.Metric(
                        labels={**self._labels, "action": action})
                metric.increment(count - seen)
                self._last["scaling"][action] = count
        if stats.migrations_started > self._last["started"]:
            self._started.increment(stats.migrations_started - self._last["started"])
            self._last["started"] = stats.migrations_started
        if stats.migration_bytes > self._last["bytes"]:
            self.bytes.increment(stats.migration_bytes - self._last["bytes"])
            self._last["bytes"] = stats.migration_bytes
        for key, count in list(stats.migrations_ended.items()):
            seen = self._last["ended"].get(key, 0)
            if count > seen:
                metric = self._ended.get(key)
                if metric is None:
                    metric = self._ended[key] = self._migrations.Metric(
                        labels={**self._labels, "status": key[0], "reason": key[1]})
                metric.increment(count - seen)
                self._last["ended"][key] = count
        new = min(stats.num_downtimes - self._last["downtimes"], len(stats.recent_downtimes_s))
        for downtime in list(stats.recent_downtimes_s)[len(stats.recent_downtimes_s) - new:]:
            self._histogram.observe(downtime)
        self._last["downtimes"] = stats.num_downtimes
