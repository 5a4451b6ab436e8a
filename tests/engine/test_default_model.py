"""Tests of the embedded default model: determinism, HF compatibility, tokenizer parity."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from preemptserve.model.default_model import (
    BOS_TOKEN_ID,
    DEFAULT_MODEL_CONFIG,
    EOS_TOKEN_ID,
    RECIPE_VERSION,
    UNK_TOKEN_ID,
    create_default_model,
    ensure_default_model,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Return a new list of the items.",
    "def f(x):\n    return x + 1\n",
    "naïve café — 日本語 🙂 Ünïcödé",
    "  leading and trailing spaces  ",
    "",
]
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preemptserve_model.json",
}


def _file_hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_default_model(tmp_path_factory.mktemp("default") / "model")


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def test_writes_expected_files_only(model_dir: Path) -> None:
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_FILES
    # No temporary build directory is left beside the model.
    assert [p.name for p in model_dir.parent.iterdir()] == ["model"]


def test_creating_twice_gives_identical_bytes(model_dir: Path, tmp_path: Path) -> None:
    again = create_default_model(tmp_path / "again")
    assert _file_hashes(again) == _file_hashes(model_dir)


def test_seed_changes_weights_only(model_dir: Path, tmp_path: Path) -> None:
    other = _file_hashes(create_default_model(tmp_path / "seed1", seed=1))
    base = _file_hashes(model_dir)
    changed = {name for name in base if base[name] != other[name]}
    assert changed == {"model.safetensors", "preemptserve_model.json"}


def test_config_values(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    expected = {
        "vocab_size": 4096,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
    }
    assert {k: config[k] for k in expected} == expected
    assert config == {
        k: list(v) if isinstance(v, tuple) else v for k, v in DEFAULT_MODEL_CONFIG.items()
    }
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["bos_token_id"] == BOS_TOKEN_ID
    assert generation["eos_token_id"] == EOS_TOKEN_ID


def test_tensor_names_shapes_and_dtype(model_dir: Path) -> None:
    layer = [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        "input_layernorm", "post_attention_layernorm",
    ]  # fmt: skip
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{name}.weight" for i in range(8) for name in layer}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == expected
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["model.embed_tokens.weight"].shape == (4096, 512)
    assert tensors["lm_head.weight"].shape == (4096, 512)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (512, 1408)
    assert tensors["lm_head.weight"].std() > 3 * tensors["model.embed_tokens.weight"].std()


def test_transformers_loads_and_generates(hf_model, hf_tokenizer) -> None:
    input_ids = torch.tensor([hf_tokenizer("Return the value").input_ids])
    out = hf_model.generate(input_ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, input_ids.shape[1] + 8)
    assert sum(p.numel() for p in hf_model.parameters()) == 29_893_120


def test_tokenizer_parity_and_round_trip(model_dir: Path, hf_tokenizer) -> None:
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert raw.get_vocab_size() == 4096
    assert (raw.token_to_id("<unk>"), raw.token_to_id("<s>"), raw.token_to_id("</s>")) == (
        UNK_TOKEN_ID,
        BOS_TOKEN_ID,
        EOS_TOKEN_ID,
    )
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    for text in TEXTS:
        ids = raw.encode(text).ids
        assert hf_tokenizer(text).input_ids == ids
        assert ids[0] == BOS_TOKEN_ID and BOS_TOKEN_ID not in ids[1:]
        assert raw.decode(ids) == text
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert hf_tokenizer("a", "b").input_ids == raw.encode("a", "b").ids


def test_greedy_margins_are_clear(hf_model) -> None:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 4096, (4, 32), generator=generator)
    input_ids[:, -1] = 100
    with torch.no_grad():
        logits = hf_model(input_ids).logits
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[..., 0] - top2[..., 1]).flatten()
    assert margins.median() > 0.05
    # Context matters: the same last token after different prefixes gives other logits.
    assert not torch.allclose(logits[0, -1], logits[1, -1])


def test_ensure_default_model_is_idempotent(model_dir: Path, tmp_path: Path) -> None:
    path = ensure_default_model(tmp_path)
    assert path == tmp_path / RECIPE_VERSION
    mtime_ns = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime_ns
    assert _file_hashes(path) == _file_hashes(model_dir)


def test_concurrent_creation_yields_one_complete_model(model_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "shared"
    errors: list[BaseException] = []

    def create() -> None:
        try:
            create_default_model(out_dir)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _file_hashes(out_dir) == _file_hashes(model_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]


def test_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        create_default_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cli_writes_model(model_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "preemptserve.model.default_model", "--out", str(out_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(out_dir)
    assert _file_hashes(out_dir) == _file_hashes(model_dir)
