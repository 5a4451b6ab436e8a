"""Prometheus metrics of an engine, next to Triton's own on the metrics port.

Imports ``triton_python_backend_utils``: only the Triton models (``model_repository*/``)
import this module, inside the Python backend's stub.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ..engine.outputs import EngineStats


class EngineMetrics:
    """Custom Prometheus metrics, next to Triton's own on the metrics port."""

    def __init__(self, model_name: str, stats: EngineStats) -> None:
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        labels = {"model": model_name}
        requests = pb_utils.MetricFamily(
            name="preemptserve_requests", description="Requests by scheduler state", kind=gauge)
        blocks = pb_utils.MetricFamily(
            name="preemptserve_kv_blocks", description="Device KV cache blocks", kind=gauge)
        self.waiting = requests.Metric(labels={**labels, "state": "waiting"})
        self.running = requests.Metric(labels={**labels, "state": "running"})
        self.preempted = requests.Metric(labels={**labels, "state": "preempted"})
        self.blocks_used = blocks.Metric(labels={**labels, "state": "used"})
        self.blocks_total = blocks.Metric(labels={**labels, "state": "total"})
        self.host_blocks_used = blocks.Metric(labels={**labels, "state": "host_used"})
        self.host_blocks_total = blocks.Metric(labels={**labels, "state": "host_total"})
        health = pb_utils.MetricFamily(
            name="preemptserve_healthy", description="1 while the engine can serve", kind=gauge)
        self.healthy = health.Metric(labels=labels)
        self.healthy.set(1)
        preemptions = pb_utils.MetricFamily(
            name="preemptserve_preemptions_total",
            description="Running requests that lost their place in the batch", kind=counter)
        recomputations = pb_utils.MetricFamily(
            name="preemptserve_recomputations_total",
            description="Preempted requests whose KV was dropped and recomputed", kind=counter)
        tokens = pb_utils.MetricFamily(
            name="preemptserve_generated_tokens_total", description="Tokens generated so far",
            kind=counter)
        swaps = pb_utils.MetricFamily(
            name="preemptserve_swaps_total", description="Requests whose KV moved tiers",
            kind=counter)
        swap_bytes = pb_utils.MetricFamily(
            name="preemptserve_swap_bytes_total", description="KV bytes moved between tiers",
            kind=counter)
        swap_seconds = pb_utils.MetricFamily(
            name="preemptserve_swap_seconds_total",
            description="Engine-thread time spent issuing or doing KV swaps", kind=counter)
        mode_tokens = pb_utils.MetricFamily(
            name="preemptserve_cache_mode_tokens_total",
            description="Tokens computed by requests in hidden-cache mode", kind=counter)
        rejected = pb_utils.MetricFamily(
            name="preemptserve_requests_rejected_total",
            description="Requests refused on arrival; reason=queue_full: max_queue_size "
                        "requests were waiting", kind=counter)
        # Incremented by execute() as it refuses a request, not from EngineStats.
        self.rejected_queue_full = rejected.Metric(labels={**labels, "reason": "queue_full"})
        shared_blocks = pb_utils.MetricFamily(
            name="preemptserve_kv_blocks_shared_total",
            description="KV blocks a sequence took from another sequence of the same prompt "
                        "(num_return_sequences) instead of allocating them", kind=counter)
        mixed_steps = pb_utils.MetricFamily(
            name="preemptserve_mixed_mode_iterations_total",
            description="Iterations whose batch held requests of both cache modes",
            kind=counter)
        # (metric, EngineStats field) pairs of counters fed by differences.
        self._counters = [
            (preemptions.Metric(labels=labels), "num_preemptions_total"),
            (recomputations.Metric(labels=labels), "num_recomputations_total"),
            (tokens.Metric(labels=labels), "num_generated_tokens_total"),
            (swaps.Metric(labels={**labels, "direction": "out"}), "num_swap_outs_total"),
            (swaps.Metric(labels={**labels, "direction": "in"}), "num_swap_ins_total"),
            (swap_bytes.Metric(labels={**labels, "direction": "out"}), "swap_out_bytes_total"),
            (swap_bytes.Metric(labels={**labels, "direction": "in"}), "swap_in_bytes_total"),
            (swap_seconds.Metric(labels=labels), "swap_time_s_total"),
            (mode_tokens.Metric(labels={**labels, "mode": "hidden"}), "num_hidden_tokens_total"),
            (mixed_steps.Metric(labels=labels), "num_mixed_mode_steps_total"),
            (shared_blocks.Metric(labels=labels), "num_shared_blocks_total"),
        ]
        self._last = {field: 0 for _, field in self._counters}
        # A family must outlive its metrics, or updates fail.
        self._families = (requests, blocks, health, preemptions, recomputations, tokens, swaps,
                          swap_bytes, swap_seconds, mode_tokens, mixed_steps, rejected,
                          shared_blocks)
        self.update(stats)

    def update(self, stats: EngineStats) -> None:
        self.waiting.set(stats.num_waiting)
        self.running.set(stats.num_running)
        self.preempted.set(stats.num_preempted)
        self.blocks_used.set(stats.num_blocks_used)
        self.blocks_total.set(stats.num_blocks_total)
        self.host_blocks_used.set(stats.num_host_blocks_used)
        self.host_blocks_total.set(stats.num_host_blocks_total)
        for metric, field in self._counters:
            # Counters only go up (Triton refuses a negative increment, and its Python
            # backend stub did not survive that refusal once): a smaller value, say after
            # an engine instance went away, is a new baseline.
            value = getattr(stats, field)
            if value > self._last[field]:
                metric.increment(value - self._last[field])
            self._last[field] = value
