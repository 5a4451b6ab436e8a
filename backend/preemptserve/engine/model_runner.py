"""Executes a ``SchedulerOutput``: builds the flat batch, runs the model, samples."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.scheduler import ScheduledRequest, SchedulerOutput
from ..model.attention import AttentionMetadata, PrefillSegment
from ..model.llama import KVCache, LlamaForCausalLM
from .hidden_batch import build_hidden_metadata
from .sampler import SamplingState, sample


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, kv_caches: list[KVCache], block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self._gather_buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.inference_mode()
    def execute(
        self, output: SchedulerOutput, states: Mapping[str, SamplingState] | None
    ) -> dict[str, int]:
        """Run one iteration; return the sampled token of every item with ``sample``.

        ``states=None`` (tensor-parallel worker ranks) runs the forward only.
        """
        prefills = [s for s in output.scheduled if s.is_prefill]
        decodes = [s for s in output.scheduled if not s.is_prefill]
        hidden_decodes: list[ScheduledRequest] = []
        has_hidden = any(s.hidden for s in output.scheduled)
        if has_hidden:
            hidden_decodes = [s for s in decodes if s.hidden]
            decodes = [s for s in decodes if not s.hidden]
        ordered = prefills + decodes + hidden_decodes
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        # (item, first row) of items whose request wants its prompt's logits.
        context_items: list[tuple[ScheduledRequest, int]] = []
        for item in ordered:
            if states is not None and _wants_context_logits(states.get(item.request_id), item):
                context_items.append((item, len(input_ids)))
            input_ids.extend(item.token_ids)
            start = item.start_position
            positions.extend(range(start, item.context_len))
            if not item.hidden:
                slots.extend(self._slots(item))
            if item.sample:
                sample_rows.append(len(input_ids) - 1)
        meta = self._metadata(prefills, decodes, slots)
        if has_hidden:
            meta.hidden = build_hidden_metadata(
                ordered, hidden_decodes, self.block_size, self.model.model.rotary,
                self.kv_caches[0][0].dtype, self.device)
            self._attach_decode_buffers(meta)
        hidden = self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_caches,
            meta,
        )
        if states is not None:
            for item, first_row in context_items:
                self._store_context_logits(hidden, item, first_row, states[item.request_id])
        if not sample_rows or states is None:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        sampled_items = [item for item in ordered if item.sample]
        tokens = sample(logits, [states[item.request_id] for item in sampled_items])
        return {item.request_id: tok for item, tok in zip(sampled_items, tokens, strict=True)}

    def _store_context_logits(self, hidden: torch.Tensor, item: ScheduledRequest,
                              first_row: int, state: SamplingState) -> None:
        """Logits of the item's prompt positions, into the request's extras."""
        extras = state.extras
        assert extras is not None
        stop = min(item.context_len, extras.num_prompt_tokens)
        rows = torch.arange(first_row, first_row + stop - item.start_position,
                            device=self.device)
        extras.store_context_logits(item.start_position,
                                    self.model.compute_logits(hidden[rows]))

    def _slots(self, item: ScheduledRequest) -> list[int]:
        bs = self.block_size
        return [
            item.block_ids[p // bs] * bs + p % bs
            for p in range(item.start_position, item.context_len)
        ]

    def _metadata(
        self, prefills: list[ScheduledRequest], decodes: list[ScheduledRequest], slots: list[int]
    ) -> AttentionMetadata:
        device = self.device
        segments = []
        token_start = 0
        for item in prefills:
            segments.append(PrefillSegment(
                token_start=token_start,
                num_tokens=item.num_tokens,
                start_position=item.start_position,
                block_table=torch.tensor(item.block_ids, device=device),
                hidden=item.hidden,
            ))
            token_start += item.num_tokens
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=device, dtype=torch.int64),
            prefills=segments,
            num_prefill_tokens=token_start,
        )
        if decodes:
            max_blocks = max(len(item.block_ids) for item in decodes)
            tables = [list(item.block_ids) + [0] * (max_blocks - len(item.block_ids))
                      for item in decodes]
            meta.decode_block_tables = torch.tensor(tables, device=device, dtype=torch.int64)
            context_lens = torch.tensor([item.context_len for item in decodes], device=device)
            key_pos = torch.arange(max_blocks * self.block_size, device=device)
            meta.decode_mask = (key_pos[None, :] < context_lens[:, None])[:, None, None, :]
            meta.decode_k_buffer, meta.decode_v_buffer = self._decode_buffers(
                len(decodes) * max_blocks)
        return meta

    def _attach_decode_buffers(self, meta: AttentionMetadata) -> None:
        """Give the KV-mode and the hidden-mode decodes disjoint rows of the gather buffers.

        Hidden rows are block rows too: ``hidden_size == num_kv_heads * head_dim`` here.
        """
        hidden = meta.hidden
        assert hidden is not None
        num_kv_rows = 0 if meta.decode_block_tables is None else meta.decode_block_tables.numel()
        num_hidden_rows = (0 if hidden.decode_block_tables is None
                           else hidden.decode_block_tables.numel())
        if not num_hidden_rows:
            return
        k_buffer, v_buffer = self._decode_buffers(num_kv_rows + num_hidden_rows)
        if num_kv_rows:
            meta.decode_k_buffer = k_buffer[:num_kv_rows]
            meta.decode_v_buffer = v_buffer[:num_kv_rows]
        hidden.decode_k_buffer = k_buffer[num_kv_rows:]
        hidden.decode_v_buffer = v_buffer[num_kv_rows:]

    def _decode_buffers(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``num_rows`` rows of two gather buffers, grown (doubled) on demand."""
        k_cache = self.kv_caches[0][0]
        if self._gather_buffers is None or self._gather_buffers[0].shape[0] < num_rows:
            rows = max(num_rows, 2 * (0 if self._gather_buffers is None
                                      else self._gather_buffers[0].shape[0]))
            shape = (rows, k_cache[0].numel())
            self._gather_buffers = (
                torch.empty(shape, dtype=k_cache.dtype, device=k_cache.device),
                torch.empty(shape, dtype=k_cache.dtype, device=k_cache.device),
            )
        k_buffer, v_buffer = self._gather_buffers
        return k_buffer[:num_rows], v_buffer[:num_rows]


def _wants_context_logits(state: SamplingState | None, item: ScheduledRequest) -> bool:
    """Whether the item feeds prompt positions of a request that wants their logits."""
    return (state is not None and state.extras is not None
            and state.extras.want_context_logits
            and item.start_position < state.extras.num_prompt_tokens)
