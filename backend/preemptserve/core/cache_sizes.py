"""How big the block pools are: one definition for the engine and the simulator. No torch.

Both turn the same configuration into the same sizes: the engine from the model's
``config.json`` (``LLMEngine.__init__``), the simulator from a cost model's figures
(``SimConfig.from_parameters``), so a simulated engine holds exactly the blocks the real
one would.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CacheConfig

# A hidden-mode block holds this many times ``block_size`` tokens: its K half and its V
# half each hold ``block_size`` hidden states (layout: ``model/attention.py``).
HIDDEN_BLOCK_FACTOR = 2


def hidden_tokens_per_block(block_size: int) -> int:
    """Tokens of a hidden-mode request per block (where the model offers the mode)."""
    return HIDDEN_BLOCK_FACTOR * block_size


@dataclass(frozen=True)
class PoolSizes:
    """The device and host block pools and what they allow.

    ``block_bytes`` is a block's K and V across all layers and all ranks (the budgets are
    totals over the ranks, so the block counts do not depend on tensor parallelism).
    ``hidden_tokens_per_block`` is 0 where hidden-cache mode is not offered.
    """

    block_size: int
    block_bytes: int
    num_blocks: int
    num_host_blocks: int
    max_model_len: int
    hidden_tokens_per_block: int


def pool_sizes(
    cache: CacheConfig,
    kv_bytes_per_token: int,
    max_position_embeddings: int | None,
    hidden_possible: bool,
    max_model_len: int | None = None,
) -> PoolSizes:
    """The pools a byte budget buys, and the longest context they (and the model) allow.

    ``kv_bytes_per_token``: K and V of one token across all layers, whole model.
    ``max_position_embeddings``: the model's limit (None or 0: unknown, no limit).
    ``hidden_possible``: the model's shape allows hidden mode; the cache config may still
    turn it off. ``max_model_len``: the configured limit (None or 0: none).
    Raises ``ValueError`` when the device budget does not buy one block.
    """
    if kv_bytes_per_token <= 0:
        raise ValueError(f"kv_bytes_per_token must be positive, got {kv_bytes_per_token}")
    block_size = cache.block_size
    block_bytes = block_size * kv_bytes_per_token
    num_blocks = cache.kv_cache_bytes // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_bytes={cache.kv_cache_bytes} is smaller than one KV block "
            f"({block_bytes} bytes)"
        )
    limits = [num_blocks * block_size]
    limits += [n for n in (max_model_len, max_position_embeddings) if n]
    return PoolSizes(
        block_size=block_size,
        block_bytes=block_bytes,
        num_blocks=num_blocks,
        num_host_blocks=cache.host_kv_cache_bytes // block_bytes,
        max_model_len=min(limits),
        hidden_tokens_per_block=(
            hidden_tokens_per_block(block_size)
            if hidden_possible and cache.enable_hidden_cache else 0
        ),
    )
