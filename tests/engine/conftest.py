"""Fixtures for engine tests: the embedded checkpoint and a GQA variant, and the reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from preemptserve.model.default_model import ensure_default_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def gqa_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A small random GQA Llama (8 query heads, 2 KV heads) written by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    out = tmp_path_factory.mktemp("gqa")
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir / name, out / name)
    return out


class Reference:
    """transformers' LlamaForCausalLM.generate, one prompt at a time, greedy, fp32."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def greedy(self, prompt_ids: list[int], num_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=num_tokens, min_new_tokens=num_tokens, pad_token_id=0,
        )
        return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def reference_factory():
    cache: dict[Path, Reference] = {}

    def get(model_dir: Path) -> Reference:
        if model_dir not in cache:
            cache[model_dir] = Reference(model_dir)
        return cache[model_dir]

    return get
