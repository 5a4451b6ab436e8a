"""The engine: tokenizer + scheduler + model runner, stepped one iteration at a time.

Not thread-safe: one thread (the serving loop) calls every method.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import EngineConfig
from ..core.block_manager import BlockManager
from ..core.cache_sizes import pool_sizes
from ..core.cost_model import CostModel
from ..core.request import (
    NORMAL_PRIORITY,
    CacheMode,
    Request,
    RequestStatus,
    SamplingParams,
    check_priority,
)
from ..core.scheduler import (
    ScheduledRequest,
    Scheduler,
    SchedulerOutput,
    create_scheduler,
    policy_class,
)
from ..model.args import LlamaArgs
from ..model.parallel import check_divisible
from .executor import Executor, LocalExecutor, ShardSpec
from .forks import PendingForks
from .iteration_stats import IterationStats
from .kv_cache import hidden_bytes_per_token, hidden_tokens_per_block, kv_bytes_per_token
from .migration import RequestMigration
from .outputs import EngineStats, RequestExtras, RequestOutput, request_metrics
from .profiling import (
    load_profile_file,
    measure_hidden_recompute_cost,
    measure_prefill_profile,
)
from .sampler import SamplingState, new_generator
from .tokenizer import IncrementalDetokenizer, TextTokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_model_dir(model_dir: str) -> Path:
    if model_dir == "default":
        from ..model.default_model import ensure_default_model

        return ensure_default_model()
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model_dir {model_dir!r} is not a directory")
    return path


class LLMEngine(RequestMigration):
    """Tokenizer + scheduler + executor; also the seams that move a request to another
    engine (``RequestMigration``, in ``migration.py``)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = _DTYPES[config.dtype]
        self.model_dir = resolve_model_dir(config.model_dir)
        self.args = LlamaArgs.from_model_dir(self.model_dir)
        self.tokenizer = TextTokenizer(self.model_dir)
        self.tensor_parallel_size = config.tensor_parallel_size
        check_divisible(self.args, self.tensor_parallel_size)

        # Block counts come from the whole model's bytes per block: the budgets are totals
        # over the ranks, so the schedule does not depend on tensor_parallel_size.
        self.kv_bytes_per_token = kv_bytes_per_token(self.args, self.dtype)
        self.hidden_bytes_per_token = hidden_bytes_per_token(self.args, self.dtype)
        _, self.hidden_unavailable_reason = hidden_tokens_per_block(
            self.args, config.cache.block_size, self.tensor_parallel_size)
        if not config.cache.enable_hidden_cache:
            self.hidden_unavailable_reason = "disabled by config"
        sizes = pool_sizes(config.cache, self.kv_bytes_per_token,
                           self.args.max_position_embeddings,
                           hidden_possible=not self.hidden_unavailable_reason,
                           max_model_len=config.max_model_len)
        block_size, num_blocks, num_host_blocks = (
            sizes.block_size, sizes.num_blocks, sizes.num_host_blocks)
        block_bytes = sizes.block_bytes
        self.block_manager = BlockManager(num_blocks, block_size, num_host_blocks,
                                          hidden_tokens_per_block=sizes.hidden_tokens_per_block)
        spec = ShardSpec(model_dir=self.model_dir, device=str(self.device), dtype=self.dtype,
                         block_size=block_size, num_blocks=num_blocks,
                         num_host_blocks=num_host_blocks)
        self.executor = _create_executor(spec, self.tensor_parallel_size)
        # Rank 0's shard (the whole model with one rank).
        self.model = self.executor.shard.model
        self.runner = self.executor.shard.runner
        self.swapper = self.executor.shard.swapper
        self.max_model_len = sizes.max_model_len
        self.cost_model = self._cost_model()
        self.scheduler: Scheduler = create_scheduler(
            config.scheduler, self.block_manager, cost_model=self.cost_model)
        self._num_generated_tokens_total = 0
        self._num_hidden_tokens_total = 0
        self._num_mixed_mode_steps_total = 0
        self._forks = PendingForks()
        self._num_shared_blocks_total = 0
        self._last_step_s = 0.0
        self._num_iterations = 0
        # With record_iteration_stats, each step() leaves its IterationStats here (off by
        # default: it walks the plan once more).
        self.record_iteration_stats = False
        self.last_iteration: IterationStats | None = None
        logger.info(
            "engine ready: policy=%s, %d KV blocks of %d tokens (%.1f MiB) on %s, "
            "%d host blocks (%.1f MiB), max_model_len=%d",
            config.scheduler.policy, num_blocks, block_size, num_blocks * block_bytes / 2**20,
            self.device, num_host_blocks, num_host_blocks * block_bytes / 2**20,
            self.max_model_len,
        )
        logger.info(
            "cache modes: KV %d bytes/token, hidden %d bytes/token; hidden mode %s",
            self.kv_bytes_per_token, self.hidden_bytes_per_token,
            "available" if self.block_manager.supports_hidden
            else f"unavailable: {self.hidden_unavailable_reason}",
        )

    def _cost_model(self) -> CostModel | None:
        """A saved profile, or one measured now, with what the policy needs of it.

        The hidden-cache recompute cost is measured (when a saved profile lacks it) only
        for policies that weigh hidden mode, and only where the mode is available.
        """
        policy = policy_class(self.config.scheduler.policy)
        if self.config.prefill_profile_path:
            profile = load_profile_file(self.config.prefill_profile_path)
        elif policy.requires_cost_model:
            profile = measure_prefill_profile(
                self.executor, self.block_manager,
                max_tokens=min(self.max_model_len,
                               self.config.scheduler.max_num_batched_tokens),
                vocab_size=self.args.vocab_size,
            )
        else:
            return None
        if (policy.requires_recompute_cost and self.block_manager.supports_hidden
                and profile.hidden_recompute_s_per_block is None):
            # Hidden mode exists only with one rank.
            profile = replace(profile, hidden_recompute_s_per_block=(
                measure_hidden_recompute_cost(self.executor, self.block_manager,
                                              max_context_len=self.max_model_len)))
        return profile

    @property
    def eos_token_id(self) -> int | None:
        return self.args.eos_token_id

    # -- requests --------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        sampling: SamplingParams,
        arrival_time_s: float | None = None,
        cache_mode: CacheMode = CacheMode.KV,
        ttft_slo_s: float | None = None,
        tbt_slo_s: float | None = None,
        *,
        echo_prompt: bool = False,
        stream: bool = True,
        priority: str = NORMAL_PRIORITY,
        return_perf_metrics: bool = False,
        fork_of: str | None = None,
    ) -> None:
        """Validate and queue a request. Raises ``ValueError`` with a user-facing message.

        ``cache_mode`` is the request's starting mode; the policy may change it later.
        ``ttft_slo_s`` / ``tbt_slo_s`` override the configured latency objectives.
        ``echo_prompt``: the output text starts with the prompt. ``stream=False``: every
        output but the last has empty text, and the last has all of it. ``priority``:
        "high" or "normal" (``core/request.py``). ``return_perf_metrics``: outputs carry the
        request's timings and block counts (``RequestOutput.metrics``). ``fork_of``: another
        sequence of the same prompt, added just before and not started yet: this one shares
        its prefill and the prompt's blocks (``engine/forks.py``).
        """
        check_priority(priority)
        if (request_id in self.scheduler.requests or request_id in self.scheduler.detached
                or request_id in self._forks):
            raise ValueError(f"duplicate request id {request_id!r}")
        if cache_mode is CacheMode.HIDDEN and not self.block_manager.supports_hidden:
            raise ValueError(
                f"hidden cache mode is unavailable for this model: "
                f"{self.hidden_unavailable_reason}")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.args.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.args.vocab_size})")
        if sampling.end_id is not None and not -1 <= sampling.end_id < self.args.vocab_size:
            raise ValueError(
                f"end_id must be in [0, {self.args.vocab_size}) or -1 (no end token), "
                f"got {sampling.end_id}"
            )
        self._check_token_ids(sampling)
        total = len(prompt_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) = "
                f"{total} exceeds the maximum context of {self.max_model_len} tokens"
            )
        if sampling.end_id is None and self.eos_token_id is not None:
            sampling = replace(sampling, end_id=self.eos_token_id)
        elif sampling.end_id == -1:  # TensorRT-LLM's "no end token": only length stops it
            sampling = replace(sampling, end_id=None)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            arrival_time_s=time.monotonic() if arrival_time_s is None else arrival_time_s,
            cache_mode=cache_mode,
            ttft_slo_s=ttft_slo_s,
            tbt_slo_s=tbt_slo_s,
            priority=priority,
            generator=new_generator(sampling, self.device),
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, prompt_ids, sampling.stop,
                echo=(prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids))
                if echo_prompt else "",
                final_only=not stream),
            extras=RequestExtras.for_request(sampling, len(prompt_ids), return_perf_metrics),
        )
        parent = self.scheduler.requests.get(fork_of) if fork_of is not None else None
        if (parent is not None and not parent.output_token_ids
                and parent.prompt_token_ids == prompt_ids
                and parent.sampling.max_tokens == sampling.max_tokens):
            # What the scheduler checks of a new request (that it could ever fit) holds:
            # the parent, the same size, passed.
            self._forks.add(parent.request_id, request)
        else:
            self.scheduler.add_request(request)

    def _check_token_ids(self, sampling: SamplingParams) -> None:
        """Token ids of banned and stop sequences and of the logit bias exist in the vocab."""
        vocab_size = self.args.vocab_size
        for name, sequences in (("bad_words", sampling.bad_words),
                                ("stop_words", sampling.stop_token_ids)):
            if any(t >= vocab_size for words in sequences for t in words):
                raise ValueError(f"{name} token ids must be in [0, {vocab_size})")
        if any(token_id >= vocab_size for token_id, _ in sampling.logit_bias):
            raise ValueError(f"embedding_bias must not be longer than the vocabulary "
                             f"({vocab_size})")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Remove a request (cancelled); its blocks return. None if unknown or done."""
        request = self._forks.discard(request_id)
        if request is not None:  # never started
            request.status = RequestStatus.FINISHED_ABORTED
            return RequestOutput(request_id=request_id, text="", token_ids=[], finished=True,
                                 finish_reason="abort",
                                 num_prompt_tokens=request.num_prompt_tokens)
        request = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        if request is None:
            return None
        for child in self._forks.pop_children(request_id):  # they go on without it
            self.scheduler.add_request(child)
        self.block_manager.unpin(request_id)  # if it was being moved
        return RequestOutput(
            request_id=request_id, text="", token_ids=[], finished=True,
            finish_reason=request.finish_reason, num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
        )

    @property
    def failure(self) -> str | None:
        """Why no step can run any more (a tensor-parallel rank died), or ``None``."""
        return self.executor.failure

    def shutdown(self) -> None:
        """Stop worker ranks, if any. The engine cannot step afterwards."""
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    def num_queued_requests(self) -> int:
        """Requests accepted and never scheduled: the queue ``max_queue_size`` bounds
        (requests preempted after they started are not in it)."""
        return self.scheduler.num_waiting

    # -- the step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, execute and post-process one iteration."""
        timestamp, start = time.time(), time.perf_counter()
        output = self.scheduler.schedule()
        requests = self.scheduler.requests
        states = {}
        for item in output.scheduled:
            request = requests[item.request_id]
            if request.extras is not None or request.sampling.processes_logits:
                states[item.request_id] = self._full_state(request, item)
            elif item.sample:
                states[item.request_id] = SamplingState(
                    request.sampling, request.generator, request.num_output_tokens)
        sampled = self.executor.execute(output, states)
        if self._forks:
            self._fork_sampled(sampled)
        self._count_cache_modes(output)
        # The iteration's measured time is the service each scheduled job received.
        self._last_step_s = time.perf_counter() - start
        # Text first: whether a stop word ended it is the scheduler's decision, with the
        # rest of the finishing rule.
        sampled_requests = [requests[request_id] for request_id in sampled]
        stop_hits = set()
        for request, token_id in zip(sampled_requests, sampled.values(), strict=True):
            request.detokenizer.append(token_id)
            may_stop = request.sampling.may_stop_at(request.num_output_tokens)
            if request.detokenizer.find_stop(enabled=may_stop) or (
                    may_stop and _ends_with_stop_ids(request, token_id)):
                stop_hits.add(request.request_id)
        finished = self.scheduler.update_from_output(output, sampled, self._last_step_s,
                                                     stop_hits)
        finished_ids = {request.request_id for request in finished}
        results = [self._output(request, token_id, request.request_id in finished_ids)
                   for request, token_id in zip(sampled_requests, sampled.values(), strict=True)]
        self._num_generated_tokens_total += len(results)
        if self.record_iteration_stats:
            self._record_iteration(output, timestamp, start)
        return results

    def _fork_sampled(self, sampled: dict[str, int]) -> None:
        """Sequences waiting for a request whose prompt this step finished get its blocks."""
        for parent_id in sampled:
            for child in self._forks.pop_children(parent_id):
                self._fork(self.scheduler.requests[parent_id], child)

    def _fork(self, parent: Request, child: Request) -> None:
        bm = self.block_manager
        num_computed = parent.num_prompt_tokens - 1  # the child feeds the last one itself
        copies = bm.fork(parent.request_id, child.request_id, num_computed)
        if copies is None:  # no block free for the copy, or a one-token prompt
            self.scheduler.add_request(child)
            return
        if copies:
            sources, destinations = zip(*copies, strict=True)
            self.executor.write_blocks(destinations, False,
                                       self.executor.read_blocks(sources, False))
        num_shared = len(bm.block_ids(child.request_id)) - len(copies)
        self._num_shared_blocks_total += num_shared
        if child.extras is not None:
            child.extras.num_blocks_reused = num_shared
        child.num_computed_tokens = num_computed
        child.cache_mode = parent.cache_mode
        child.first_scheduled_time_s = parent.first_scheduled_time_s
        self.scheduler.adopt(child, None)

    def _record_iteration(self, output: SchedulerOutput, timestamp: float, start: float) -> None:
        sched, bm = self.scheduler, self.block_manager
        self.last_iteration = IterationStats.of_step(
            self._num_iterations, output, timestamp, start, self._last_step_s, bm.block_size,
            num_unfinished=len(sched.requests),
            num_waiting=sched.num_waiting,
            num_running=sched.num_running,
            num_preempted=sched.num_preempted,
            num_blocks_used=bm.num_used_blocks,
            num_host_blocks_used=bm.num_used_host_blocks,
        )
        self._num_iterations += 1

    def _count_cache_modes(self, output: SchedulerOutput) -> None:
        num_hidden_tokens = sum(item.num_tokens for item in output.scheduled if item.hidden)
        if num_hidden_tokens:
            self._num_hidden_tokens_total += num_hidden_tokens
            if num_hidden_tokens < output.num_batched_tokens:
                self._num_mixed_mode_steps_total += 1

    @staticmethod
    def _full_state(request: Request, item: ScheduledRequest) -> SamplingState:
        """The sampling state of a request that processes logits or wants extras; the
        block counts its extras keep are updated here."""
        extras = request.extras
        if extras is not None and extras.want_metrics:
            extras.num_blocks_total = max(extras.num_blocks_total, len(item.block_ids))
        history = ((request.prompt_token_ids, request.output_token_ids)
                   if request.sampling.processes_logits else None)
        return SamplingState(request.sampling, request.generator, request.num_output_tokens,
                             history, extras)

    @staticmethod
    def _output(request: Request, token_id: int, finished: bool) -> RequestOutput:
        """One sampled token as an output; ``finished`` and its reason are the scheduler's."""
        output = RequestOutput(
            request_id=request.request_id,
            text=request.detokenizer.take_delta(finished),
            token_ids=[token_id],
            finished=finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
        )
        extras = request.extras
        if extras is not None:
            now = time.monotonic()
            if extras.first_token_time_s is None:
                extras.first_token_time_s = now
            extras.last_token_time_s = now
            if extras.want_log_probs:
                output.log_probs = [extras.step_log_prob]  # type: ignore[list-item]
            if extras.want_generation_logits and extras.step_logits is not None:
                output.generation_logits = extras.step_logits[None]
            output.context_logits = extras.take_context_logits()
            if extras.want_metrics:
                output.metrics = request_metrics(request)
        return output

    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            num_preempted=self.scheduler.num_preempted,
            num_blocks_used=self.block_manager.num_used_blocks,
            num_blocks_total=self.block_manager.num_blocks,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            num_recomputations_total=self.scheduler.num_recomputations_total,
            num_generated_tokens_total=self._num_generated_tokens_total,
            last_step_s=self._last_step_s,
            num_host_blocks_used=self.block_manager.num_used_host_blocks,
            num_host_blocks_total=self.block_manager.num_host_blocks,
            num_swap_outs_total=self.scheduler.num_swap_outs,
            num_swap_ins_total=self.scheduler.num_swap_ins,
            # Every rank moves its slice of the same blocks.
            swap_out_bytes_total=self.swapper.stats.bytes_out * self.tensor_parallel_size,
            swap_in_bytes_total=self.swapper.stats.bytes_in * self.tensor_parallel_size,
            swap_time_s_total=self.swapper.stats.time_s,
            kv_bytes_per_token=self.kv_bytes_per_token,
            hidden_bytes_per_token=self.hidden_bytes_per_token,
            hidden_mode_available=self.block_manager.supports_hidden,
            num_hidden_tokens_total=self._num_hidden_tokens_total,
            num_mixed_mode_steps_total=self._num_mixed_mode_steps_total,
            num_shared_blocks_total=self._num_shared_blocks_total,
        )

    def generate(self, prompts: list[str], sampling: SamplingParams) -> list[str]:
        """Run prompts to completion in this thread (tests, benchmarks)."""
        ids = [f"gen-{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, prompt, sampling)
        texts = {request_id: "" for request_id in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                texts[out.request_id] += out.text
        return [texts[i] for i in ids]


def _ends_with_stop_ids(request: Request, token_id: int) -> bool:
    """Whether the output, with ``token_id`` appended, ends with a stop token sequence."""
    for words in request.sampling.stop_token_ids:
        if words[-1] != token_id or len(words) > request.num_output_tokens + 1:
            continue
        if len(words) == 1 or request.output_token_ids[1 - len(words):] == list(words[:-1]):
            return True
    return False


def _create_executor(spec: ShardSpec, tensor_parallel_size: int) -> Executor:
    if tensor_parallel_size == 1:
        return LocalExecutor(spec)
    from .tp_executor import TensorParallelExecutor

    return TensorParallelExecutor(spec, tensor_parallel_size)
