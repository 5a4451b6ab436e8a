"""Benchmark harness: workloads, an open-loop load generator, metrics and reports.

``python -m preemptserve.bench --help`` lists the commands. The pure parts (workloads,
metrics, reports) import neither torch nor Triton; ``loadgen`` needs ``tritonclient``
and ``profile`` runs the real engine (torch).
"""
