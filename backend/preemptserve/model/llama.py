"""A Llama-architecture decoder (RMSNorm, rotary embeddings, SwiGLU, MHA and GQA).

Forward runs over a flat batch of tokens from many requests (prefill chunks and decode
tokens mixed), reading and writing a paged KV cache. Q/K/V and gate/up are fused into
one matmul each; ``checkpoint.load_model`` splits Hugging Face tensors into them.
With tensor parallelism (``tp``) each rank builds only its heads and MLP units
(``parallel.py``); with one rank the layers are plain matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import LlamaArgs
from .attention import AttentionMetadata, paged_attention, write_cache
from .parallel import SINGLE, MergedColumnParallelLinear, RowParallelLinear, TensorParallel
from .rope import RotaryEmbedding, apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]
Rotary = tuple[torch.Tensor, torch.Tensor]  # cos, sin of the step's positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm normalises in fp32, then scales in the input dtype.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused kernel
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * normed.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        # This rank's heads; the projections hold only their rows / columns.
        self.num_heads = args.num_heads // tp.world_size
        self.num_kv_heads = args.num_kv_heads // tp.world_size
        self.head_dim = args.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        q_full, kv_full = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.qkv_proj = MergedColumnParallelLinear(args.hidden_size, (q_full, kv_full, kv_full),
                                                   tp)
        self.o_proj = RowParallelLinear(q_full, args.hidden_size, tp)

    def forward(
        self, rotary: Rotary, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, *rotary)
        write_cache(kv_cache[0], kv_cache[1], x, k, v, meta)
        # Hidden-mode requests recompute their past K/V with the fused weight's K/V rows.
        kv_weight = None if meta.hidden is None else self.qkv_proj.weight[self.q_size:]
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, kv_weight)  # [T, Hq, hd]
        return self.o_proj(o.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        f = args.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(args.hidden_size, (f, f), tp)
        self.down_proj = RowParallelLinear(f, args.hidden_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = LlamaAttention(args, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = LlamaMLP(args, tp)

    def forward(
        self, rotary: Rotary, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(rotary, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.rotary = RotaryEmbedding(args, args.max_position_embeddings)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, tp) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.args = args
        self.tp = tp
        self.model = LlamaModel(args, tp)
        # Only rank 0 samples, so only rank 0 holds the (replicated) LM head.
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False) \
            if tp.rank == 0 else None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        rotary = self.model.rotary.lookup(positions, x.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(rotary, x, kv_cache, meta)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.lm_head is not None, "logits are computed on rank 0 only"
        return self.lm_head(hidden).float()
