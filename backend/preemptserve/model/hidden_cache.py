"""Hidden-cache mode (Apt-Serve): store the normalised attention input, recompute K/V.

A hidden-mode request keeps, per layer and token, the input of ``qkv_proj`` (``hidden_size``
values) in the K/V block pool instead of K and V; the layout is drawn in ``attention.py``.
Attention over its past tokens recomputes K and V from those rows with the K/V rows of the
fused QKV weight and applies rotary at their positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rope import rotate


@dataclass
class HiddenMetadata:
    """The hidden-mode part of a step that has any hidden-mode request.

    Token rows index the step's flat batch. Hidden-mode decodes come last, after the
    KV-mode decodes, so their rows are the step's final ``num_decodes`` rows.
    """

    kv_rows: torch.Tensor  # [T_kv] int64: rows of KV-mode tokens (slot_mapping is theirs)
    # Hidden-mode tokens whose slot is in the K tensor (half 0) and in the V tensor (half 1):
    # their rows, and their row in that tensor viewed as [num_blocks * block_size, hidden].
    k_half_rows: torch.Tensor
    k_half_slots: torch.Tensor
    v_half_rows: torch.Tensor
    v_half_slots: torch.Tensor
    # Rotary of positions 0 .. L-1 for recomputed keys, [L, 1, hd] each; L covers every
    # hidden-mode context of the step, padding included.
    cos: torch.Tensor
    sin: torch.Tensor
    decode_block_tables: torch.Tensor | None = None  # [Dh, max_blocks] int64, zero padded
    decode_mask: torch.Tensor | None = None  # [Dh, 1, 1, max_blocks * 2 * block_size] bool
    decode_k_buffer: torch.Tensor | None = None  # reused gather outputs, as for KV decodes
    decode_v_buffer: torch.Tensor | None = None

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode_block_tables is None else self.decode_block_tables.shape[0]


def write_hidden(
    k_cache: torch.Tensor, v_cache: torch.Tensor, x: torch.Tensor, meta: HiddenMetadata
) -> None:
    """Store the hidden-mode tokens' normalised inputs ``x`` [T, hidden] in their slots."""
    hidden_size = x.shape[-1]
    if meta.k_half_slots.numel():
        k_cache.view(-1, hidden_size).index_copy_(
            0, meta.k_half_slots, x.index_select(0, meta.k_half_rows))
    if meta.v_half_slots.numel():
        v_cache.view(-1, hidden_size).index_copy_(
            0, meta.v_half_slots, x.index_select(0, meta.v_half_rows))


def gather_hidden(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    k_buffer: torch.Tensor | None = None, v_buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states of hidden-mode tables [N, nb] in position order: [N, nb * 2B, hidden]."""
    num_tables, num_blocks = block_tables.shape
    flat_ids = block_tables.reshape(-1)
    kx = torch.index_select(k_cache.view(k_cache.shape[0], -1), 0, flat_ids,
                            **({} if k_buffer is None else {"out": k_buffer}))
    vx = torch.index_select(v_cache.view(v_cache.shape[0], -1), 0, flat_ids,
                            **({} if v_buffer is None else {"out": v_buffer}))
    # Per block: its K-tensor rows (offsets 0..B-1), then its V-tensor rows (B..2B-1).
    xs = torch.stack((kx, vx), dim=1)  # [N * nb, 2, B * hidden]
    return xs.view(num_tables, num_blocks * 2 * k_cache.shape[1], -1)


def recompute_kv(
    xs: torch.Tensor, kv_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    num_kv_heads: int, head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K (rotary applied) and V of positions 0..L-1 from xs [..., L, hidden].

    ``kv_weight`` is the K then V rows of the fused QKV weight, [2 * Hkv * hd, hidden];
    cos, sin: [L, 1, hd]. Returns k, v: [..., L, Hkv, hd].
    """
    kv = F.linear(xs, kv_weight)  # [..., L, 2 * Hkv * hd]
    k, v = kv.split(num_kv_heads * head_dim, dim=-1)
    k = k.unflatten(-1, (num_kv_heads, head_dim))
    v = v.unflatten(-1, (num_kv_heads, head_dim))
    return rotate(k, cos, sin), v
