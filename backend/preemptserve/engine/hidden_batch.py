"""Builds the hidden-mode part of a step's attention metadata (layout: model/attention.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.cache_sizes import hidden_tokens_per_block
from ..core.scheduler import ScheduledRequest
from ..model.hidden_cache import HiddenMetadata
from ..model.rope import RotaryEmbedding


def build_hidden_metadata(
    ordered: Sequence[ScheduledRequest],
    hidden_decodes: Sequence[ScheduledRequest],
    block_size: int,
    rotary: RotaryEmbedding,
    dtype: torch.dtype,
    device: torch.device,
) -> HiddenMetadata:
    """``ordered``: the step's items in flat-batch order, hidden-mode decodes last.

    The decode gather buffers are left to the caller (they share the KV decodes' pool).
    """
    tokens_per_block = hidden_tokens_per_block(block_size)
    kv_rows: list[int] = []
    halves: tuple[tuple[list[int], list[int]], ...] = (([], []), ([], []))  # (rows, slots)
    max_len = 0  # longest recomputed context, padded to whole blocks
    row = 0
    for item in ordered:
        if not item.hidden:
            kv_rows.extend(range(row, row + item.num_tokens))
            row += item.num_tokens
            continue
        table = item.block_ids
        for position in range(item.start_position, item.context_len):
            offset = position % tokens_per_block
            rows, slots = halves[offset // block_size]
            rows.append(row)
            slots.append(table[position // tokens_per_block] * block_size + offset % block_size)
            row += 1
        if item.start_position > 0:
            max_len = max(max_len, len(table) * tokens_per_block)
    (k_rows, k_slots), (v_rows, v_slots) = halves
    # Padded key positions may pass the rotary table's end; they are masked out anyway.
    positions = torch.arange(max_len, device=device).clamp_(max=rotary.cos.shape[0] - 1)
    cos, sin = rotary.lookup(positions, dtype)

    def longs(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, device=device, dtype=torch.int64)

    meta = HiddenMetadata(
        kv_rows=longs(kv_rows),
        k_half_rows=longs(k_rows), k_half_slots=longs(k_slots),
        v_half_rows=longs(v_rows), v_half_slots=longs(v_slots),
        cos=cos, sin=sin,
    )
    if hidden_decodes:
        max_blocks = max(len(item.block_ids) for item in hidden_decodes)
        tables = [list(item.block_ids) + [0] * (max_blocks - len(item.block_ids))
                  for item in hidden_decodes]
        meta.decode_block_tables = longs(tables)
        context_lens = torch.tensor([item.context_len for item in hidden_decodes],
                                    device=device)
        key_pos = torch.arange(max_blocks * tokens_per_block, device=device)
        meta.decode_mask = (key_pos[None, :] < context_lens[:, None])[:, None, None, :]
    return meta
