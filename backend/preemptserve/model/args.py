"""Model hyper-parameters read from a Hugging Face ``config.json`` (Llama family)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        d, f = self.hidden_size, self.intermediate_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def matmul_flops_per_token(self) -> int:
        """FLOPs of the weight matmuls for one token (2 per multiply-add), lm_head included."""
        d, f = self.hidden_size, self.intermediate_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f
        return 2 * (self.num_layers * per_layer + self.vocab_size * d)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> LlamaArgs:
        arch = config.get("architectures") or []
        model_type = config.get("model_type", "llama")
        if model_type not in ("llama", "mistral") and "LlamaForCausalLM" not in arch:
            raise ValueError(f"unsupported model_type {model_type!r} (Llama architecture only)")
        num_heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        head_dim = config.get("head_dim") or hidden // num_heads
        scaling = config.get("rope_scaling")
        eos = config.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            rms_norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=eos,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> LlamaArgs:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        return cls.from_hf_config(json.loads(path.read_text()))
