"""The block pools' tensors: one K and one V tensor per layer.

Also what each cache mode costs per token and whether the model allows hidden-cache mode
(the layout it relies on is drawn in ``model/attention.py``). How many blocks a byte
budget buys is ``core.cache_sizes.pool_sizes`` (shared with the simulator).
"""

from __future__ import annotations

import torch

from ..core.cache_sizes import hidden_tokens_per_block as cache_hidden_tokens_per_block
from ..model.args import LlamaArgs
from ..model.llama import KVCache


def bytes_per_block(args: LlamaArgs, block_size: int, dtype: torch.dtype) -> int:
    """K and V of ``block_size`` tokens across all layers."""
    return block_size * kv_bytes_per_token(args, dtype)


def kv_bytes_per_token(args: LlamaArgs, dtype: torch.dtype) -> int:
    """K and V of one token across all layers, whole model (all ranks together)."""
    return args.kv_bytes_per_token(torch.finfo(dtype).bits // 8)


def hidden_bytes_per_token(args: LlamaArgs, dtype: torch.dtype) -> int:
    """The normalised attention input of one token across all layers.

    The same on every rank: each needs the whole hidden state to recompute its own heads'
    K/V (sharding it would cost an all-gather per layer per step).
    """
    return args.num_layers * args.hidden_size * (torch.finfo(dtype).bits // 8)


def hidden_tokens_per_block(args: LlamaArgs, block_size: int, tp_size: int = 1) -> tuple[int, str]:
    """Tokens of a hidden-mode request per block, and why it is 0 (mode refused) if so.

    A block holds ``block_size`` tokens' K and V; where ``num_kv_heads * head_dim ==
    hidden_size`` (multi-head attention) its K half and its V half each hold
    ``block_size`` hidden states (``core.cache_sizes.hidden_tokens_per_block``; layout in
    ``model/attention.py``).
    """
    kv_size = args.num_kv_heads * args.head_dim  # values per token in K (and in V)
    if tp_size > 1:
        return 0, (
            f"tensor parallelism (TP={tp_size}): each rank would hold the whole hidden state "
            f"({args.hidden_size} values per token and layer) to recompute its own heads' K/V, "
            f"against {2 * kv_size // tp_size} for its K/V shard: no memory saved")
    if args.hidden_size >= 2 * kv_size:
        return 0, (
            f"grouped-query attention: the hidden state ({args.hidden_size} values per token "
            f"and layer) is at least as large as K+V ({2 * kv_size}): no memory saved")
    if args.hidden_size != kv_size:
        return 0, (
            f"the hidden cache shares K/V blocks and needs num_kv_heads * head_dim "
            f"({kv_size}) == hidden_size ({args.hidden_size})")
    return cache_hidden_tokens_per_block(block_size), ""


def allocate_kv_caches(
    args: LlamaArgs, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype,
    pin_memory: bool = False,
) -> list[KVCache]:
    """Per layer: (k, v), each [num_blocks, block_size, num_kv_heads, head_dim], zeroed.

    ``pin_memory`` (host pool beside a CUDA device) page-locks it for async copies.
    """
    shape = (num_blocks, block_size, args.num_kv_heads, args.head_dim)
    return [
        (
            torch.zeros(shape, device=device, dtype=dtype, pin_memory=pin_memory),
            torch.zeros(shape, device=device, dtype=dtype, pin_memory=pin_memory),
        )
        for _ in range(args.num_layers)
    ]
