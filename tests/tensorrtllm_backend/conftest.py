"""Upstream files, run as scripts by the tests: nothing here is collected (SOURCE.md)."""

collect_ignore = ["all_models", "inflight_batcher_llm", "tools"]
