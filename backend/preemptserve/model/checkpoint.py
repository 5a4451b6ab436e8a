"""Load a Hugging Face Llama checkpoint directory (config.json + *.safetensors)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from .args import LlamaArgs
from .llama import LlamaForCausalLM
from .parallel import (
    SINGLE,
    MergedColumnParallelLinear,
    ParallelLinear,
    RowParallelLinear,
    TensorParallel,
    check_divisible,
    source_shape,
)
from .rope import RotaryEmbedding

logger = logging.getLogger(__name__)

# HF tensor name suffix -> (our parameter suffix, shard index within the fused tensor)
_FUSED = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype,
    tp: TensorParallel = SINGLE,
) -> LlamaForCausalLM:
    """Build the model (this rank's shard) on ``device`` and fill it from the checkpoint.

    Reads only this rank's slice of every tensor-parallel weight. Raises ``ValueError``
    naming the tensors if the checkpoint does not match the config (full shapes are
    checked, so every rank reports the same mismatch).
    """
    model_dir = Path(model_dir)
    args = LlamaArgs.from_model_dir(model_dir)
    check_divisible(args, tp.world_size)
    with torch.device("meta"):
        model = LlamaForCausalLM(args, tp)
    model = model.to_empty(device=device).to(dtype)
    # The rotary tables were built on the meta device: rebuild them on the real one.
    model.model.rotary = RotaryEmbedding(args, args.max_position_embeddings).to(device)

    params = dict(model.named_parameters())
    parallel = {f"{name}.weight": module for name, module in model.named_modules()
                if isinstance(module, MergedColumnParallelLinear | RowParallelLinear)}
    skipped = set() if model.lm_head is not None else {"lm_head.weight"}
    loaded: set[str] = set()
    unexpected: list[str] = []
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or name in skipped:
                    continue
                target, shard = _target(name)
                source = f.get_slice(name)
                if target in parallel:
                    module = parallel[target]
                    _check_shape(name, source_shape(source), module.full_shape(shard))
                    module.load(source, shard)
                    loaded.add(f"{target}#{shard}")
                elif target in params:
                    param = params[target]
                    _check_shape(name, source_shape(source), tuple(param.shape))
                    param.data.copy_(source[:])
                    loaded.add(target)
                else:
                    unexpected.append(name)
    if args.tie_word_embeddings and model.lm_head is not None:
        model.lm_head.weight = model.model.embed_tokens.weight
    expected = _expected_keys(args, params, parallel)
    missing = sorted(expected - loaded)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {model_dir} does not match config.json: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    logger.info("loaded %s: %.1fM parameters on %s (%s), tensor-parallel rank %d of %d",
                model_dir, args.num_params() / 1e6, device, dtype, tp.rank, tp.world_size)
    return model.eval()


def _check_shape(name: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if actual != expected:
        raise ValueError(
            f"checkpoint does not match config.json: {name} has shape "
            f"{actual}, expected {expected}"
        )


def _target(name: str) -> tuple[str, int]:
    """Our parameter for a checkpoint tensor, and its shard within a fused weight."""
    for suffix, (param_suffix, shard) in _FUSED.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + param_suffix, shard
    return name, 0


def _expected_keys(args: LlamaArgs, params: dict[str, torch.nn.Parameter],
                   parallel: dict[str, ParallelLinear]) -> set[str]:
    keys: set[str] = set()
    for name in params:
        if args.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name in parallel:
            keys.update(f"{name}#{shard}" for shard in range(parallel[name].num_shards))
        else:
            keys.add(name)
    return keys
