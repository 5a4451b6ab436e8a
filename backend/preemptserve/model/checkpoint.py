"""Load a Hugging Face Llama checkpoint directory (config.json + *.safetensors)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from .args import LlamaArgs
from .llama import LlamaForCausalLM
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


def _fused_row_range(args: LlamaArgs, param_suffix: str, shard: int) -> tuple[int, int]:
    if param_suffix.endswith("qkv_proj.weight"):
        q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)][shard]
    f = args.intermediate_size
    return [(0, f), (f, 2 * f)][shard]


def load_model(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype
) -> LlamaForCausalLM:
    """Build the model on ``device`` and fill every parameter from the checkpoint.

    Raises ``ValueError`` naming the tensors if the checkpoint does not match the config.
    """
    model_dir = Path(model_dir)
    args = LlamaArgs.from_model_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    model = model.to_empty(device=device).to(dtype)
    # The rotary tables were built on the meta device: rebuild them on the real one.
    model.model.rotary = RotaryEmbedding(args, args.max_position_embeddings).to(device)

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                tensor = f.get_tensor(name)
                target, rows = _target(args, name)
                if target not in params:
                    unexpected.append(name)
                    continue
                param = params[target]
                dest = param.data if rows is None else param.data[rows[0] : rows[1]]
                if dest.shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint does not match config.json: {name} has shape "
                        f"{tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                    )
                dest.copy_(tensor.to(dtype))
                loaded.add(name if rows is None else f"{target}#{rows[0]}")
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    expected = _expected_keys(args, params)
    missing = sorted(expected - loaded)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {model_dir} does not match config.json: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    logger.info("loaded %s: %.1fM parameters on %s (%s)", model_dir,
                args.num_params() / 1e6, device, dtype)
    return model.eval()


def _target(args: LlamaArgs, name: str) -> tuple[str, tuple[int, int] | None]:
    for suffix, (param_suffix, shard) in _FUSED.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + param_suffix, _fused_row_range(args, param_suffix, shard)
    return name, None


def _expected_keys(args: LlamaArgs, params: dict[str, torch.nn.Parameter]) -> set[str]:
    keys: set[str] = set()
    for name in params:
        if args.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith(("qkv_proj.weight", "gate_up_proj.weight")):
            num_shards = 3 if name.endswith("qkv_proj.weight") else 2
            for shard in range(num_shards):
                keys.add(f"{name}#{_fused_row_range(args, name, shard)[0]}")
        else:
            keys.add(name)
    return keys
