"""Attention over a paged KV cache, in plain PyTorch (runs on CPU and CUDA).

Cache layout, one pair of tensors per layer::

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    token at position p of a request lives in block block_table[p // block_size],
    row p % block_size; its flat slot is block_id * block_size + p % block_size.

A request in hidden-cache mode (Apt-Serve) stores per layer the normalised attention input
x (``hidden_size`` values) instead of K and V, in the same blocks. Where
``num_kv_heads * head_dim == hidden_size`` (multi-head attention) a block's K tensor and
its V tensor are each ``[block_size, hidden_size]`` of rows, so one block holds
``2 * block_size`` hidden tokens (B = block_size)::

    block_table[p // 2B] = b         k_cache[b] as [B, hidden]   v_cache[b] as [B, hidden]
    offset o = p % 2B                row o      (o <  B)         row o - B  (o >= B)
    e.g. B = 4: positions 0..3 -> k_cache[b] rows 0..3, 4..7 -> v_cache[b] rows 0..3

Any other shape gets no hidden mode (``engine/kv_cache.hidden_tokens_per_block``): under
GQA x is at least as large as K+V, and under tensor parallelism every rank would need all
of x to recompute its own heads (x replicated: no saving; sharded: an all-gather per layer
per step). Swaps move whole blocks, so they need not know the mode.

A step's tokens are laid out prefill segments first, then one token per KV-mode decode,
then one per hidden-mode decode. Prefill segments run one attention call each (causal);
decodes run batched, their keys gathered through the block tables and padded, with a mask
for the padding. Hidden-mode requests attend like KV-mode ones, except that a later
prefill chunk or a decode first recomputes K and V of its whole context (this step's
tokens included) from the gathered hidden rows (``hidden_cache.py``); a first prefill
chunk uses its own K and V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hidden_cache import HiddenMetadata, gather_hidden, recompute_kv, write_hidden


@dataclass
class PrefillSegment:
    token_start: int  # first row of this segment in the step's flat token batch
    num_tokens: int
    start_position: int  # position of the first token; > 0 for a later chunk
    block_table: torch.Tensor  # [num_blocks_of_request] int64
    hidden: bool = False  # the request is in hidden-cache mode


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of every new token
    prefills: list[PrefillSegment]
    num_prefill_tokens: int
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks] int64, zero padded
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_blocks * block_size] bool
    # Reused outputs of the decode gathers, [D * max_blocks, block_size * Hkv * hd] each:
    # fresh multi-MB tensors every layer cost more in page faults than the copy itself.
    decode_k_buffer: torch.Tensor | None = None
    decode_v_buffer: torch.Tensor | None = None
    # Only when the step has hidden-mode requests; None keeps the KV-only path as it was.
    hidden: HiddenMetadata | None = None

    @property
    def num_decode_tokens(self) -> int:
        return 0 if self.decode_block_tables is None else self.decode_block_tables.shape[0]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def write_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, x: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, meta: AttentionMetadata,
) -> None:
    """Store the step's tokens: K/V of KV-mode tokens, x [T, hidden] of hidden-mode ones."""
    hidden = meta.hidden
    if hidden is None:
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return
    if hidden.kv_rows.numel():
        write_kv(k_cache, v_cache, k.index_select(0, hidden.kv_rows),
                 v.index_select(0, hidden.kv_rows), meta.slot_mapping)
    write_hidden(k_cache, v_cache, x, hidden)


def gather_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows of ``cache`` (one block each) in ``block_ids`` order: [len(ids), block elems]."""
    flat = cache.view(cache.shape[0], -1)
    if out is None:
        return torch.index_select(flat, 0, block_ids)
    return torch.index_select(flat, 0, block_ids, out=out)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    kv_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, Hq, hd]; k, v: [T, Hkv, hd] of the new tokens (already written to the cache).

    ``kv_weight`` (the K and V rows of the fused QKV weight) is needed when the step has
    hidden-mode requests. Returns [T, Hq, hd].
    """
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    gqa = q.shape[1] != num_kv_heads
    out = torch.empty_like(q)
    for seg in meta.prefills:
        rows = slice(seg.token_start, seg.token_start + seg.num_tokens)
        qs = q[rows].transpose(0, 1)  # [Hq, n, hd]
        if seg.start_position == 0:
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        else:
            context_len = seg.start_position + seg.num_tokens
            if seg.hidden:
                assert meta.hidden is not None and kv_weight is not None
                xs = gather_hidden(k_cache, v_cache, seg.block_table[None])[0, :context_len]
                ks, vs = recompute_kv(xs, kv_weight, meta.hidden.cos[:context_len],
                                      meta.hidden.sin[:context_len], num_kv_heads, head_dim)
            else:
                ks = gather_blocks(k_cache, seg.block_table).view(-1, num_kv_heads, head_dim)
                vs = gather_blocks(v_cache, seg.block_table).view(-1, num_kv_heads, head_dim)
                ks, vs = ks[:context_len], vs[:context_len]
            q_pos = torch.arange(seg.num_tokens, device=q.device) + seg.start_position
            mask = torch.arange(context_len, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(
                qs, ks.transpose(0, 1), vs.transpose(0, 1), attn_mask=mask, enable_gqa=gqa
            )
        out[rows] = o.transpose(0, 1)
    if meta.decode_block_tables is not None:
        num_decodes = meta.decode_block_tables.shape[0]
        rows = slice(meta.num_prefill_tokens, meta.num_prefill_tokens + num_decodes)
        qd = q[rows].unsqueeze(2)  # [D, Hq, 1, hd]
        tables = meta.decode_block_tables.view(-1)
        kd = gather_blocks(k_cache, tables, meta.decode_k_buffer)
        vd = gather_blocks(v_cache, tables, meta.decode_v_buffer)
        kd = kd.view(num_decodes, -1, num_kv_heads, head_dim)  # [D, L, Hkv, hd]
        vd = vd.view(num_decodes, -1, num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(
            qd, kd.transpose(1, 2), vd.transpose(1, 2), attn_mask=meta.decode_mask,
            enable_gqa=gqa,
        )
        out[rows] = o.squeeze(2)
    if meta.hidden is not None and meta.hidden.decode_block_tables is not None:
        assert kv_weight is not None
        _hidden_decode_attention(q, k_cache, v_cache, kv_weight, meta.hidden, out)
    return out


def _hidden_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_weight: torch.Tensor,
    meta: HiddenMetadata, out: torch.Tensor,
) -> None:
    """Batched hidden-mode decodes (the step's last rows): recompute K/V, then attend."""
    assert meta.decode_block_tables is not None
    num_decodes = meta.num_decodes
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    xs = gather_hidden(k_cache, v_cache, meta.decode_block_tables,
                       meta.decode_k_buffer, meta.decode_v_buffer)  # [Dh, L, hidden]
    length = xs.shape[1]
    kd, vd = recompute_kv(xs, kv_weight, meta.cos[:length], meta.sin[:length],
                          num_kv_heads, head_dim)  # [Dh, L, Hkv, hd]
    qd = q[-num_decodes:].unsqueeze(2)  # [Dh, Hq, 1, hd]
    o = F.scaled_dot_product_attention(
        qd, kd.transpose(1, 2), vd.transpose(1, 2), attn_mask=meta.decode_mask,
        enable_gqa=q.shape[1] != num_kv_heads,
    )
    out[-num_decodes:] = o.squeeze(2)
