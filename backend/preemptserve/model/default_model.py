"""The embedded default model: a deterministic random-weight Llama checkpoint.

preemptserve serves, by default, a checkpoint it builds itself, so that the whole stack
(tokenizer, weight loading, paged-KV engine, Triton adapter) can run without downloading
anything. The checkpoint is a Llama-architecture model in the exact Hugging Face layout:

    DIR/
      config.json               LlamaConfig, see DEFAULT_MODEL_CONFIG
      generation_config.json    bos/eos ids, greedy by default
      model.safetensors         fp32, tensor names as HF LlamaForCausalLM
      tokenizer.json            byte-level BPE trained on assets/corpus.txt
      tokenizer_config.json     PreTrainedTokenizerFast, add_bos_token
      special_tokens_map.json
      preemptserve_model.json   recipe version + seed (written last; marks completeness)

It is loaded by the same code path as a real Llama checkpoint. **Its weights are random,
so the text it produces is meaningless**; it exists to exercise the serving machinery and
to compare the engine's greedy tokens against ``transformers``.

Every byte is a function of the recipe (``RECIPE_VERSION``), the seed and the shipped
corpus: weights come from a fixed-seed CPU ``torch.Generator`` and BPE training is
deterministic. ``lm_head`` is drawn with a larger std than the other matrices so the
greedy argmax has clear margins (fp32 batched inference must not flip near-ties).

CLI: ``python -m preemptserve.model.default_model --out DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

# Bump whenever anything that changes the written bytes changes (weights, tokenizer,
# config, corpus); the cache directory is named after it.
RECIPE_VERSION = "default-llama-v1"
MARKER_FILE_NAME = "preemptserve_model.json"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "preemptserve"

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
# Special tokens take the first ids, in Llama's order: <unk>=0, <s>=1, </s>=2.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
SPECIAL_TOKEN_IDS = (UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID)

VOCAB_SIZE = 4096
MAX_POSITION_EMBEDDINGS = 2048

WEIGHT_STD = 0.02
# Logits = normalized hidden (RMS ~1, width 512) @ lm_head: std ~0.1 * sqrt(512) ~ 2.3,
# so the top-1/top-2 gap over 4096 logits is typically ~0.4, far above fp32 noise.
LM_HEAD_STD = 0.1
# Norm weights are 1 + noise rather than exactly 1, so an engine that forgets to apply
# them produces different tokens instead of passing by accident.
NORM_WEIGHT_NOISE_STD = 0.1

DEFAULT_MODEL_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "architectures": ("LlamaForCausalLM",),
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": WEIGHT_STD,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
    }
)
"""Contents of the default model's ``config.json`` (read-only; tuples are written as lists)."""


def _corpus_text() -> str:
    """The shipped tokenizer-training corpus (Python stdlib docstrings, PSF licence)."""
    corpus = resources.files("preemptserve").joinpath("assets", "corpus.txt")
    return corpus.read_text(encoding="utf-8")


def train_tokenizer() -> Tokenizer:
    """Train the default byte-level BPE tokenizer on the shipped corpus.

    Contract: deterministic (same ``to_str()`` on every run), ``get_vocab_size() ==
    VOCAB_SIZE`` with the special tokens at ids 0..2, every byte string encodable (the
    256 byte symbols are in the initial alphabet), ``decode(encode(s)) == s``, and a
    single sequence is encoded as ``<s> $A`` like Llama.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Lines keep their newlines so newline and indentation tokens are learned too.
    tokenizer.train_from_iterator(_corpus_text().splitlines(keepends=True), trainer=trainer)
    # Same template transformers builds for add_bos_token=True, so both paths agree.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocab has {tokenizer.get_vocab_size()} != {VOCAB_SIZE}")
    for token, token_id in zip(SPECIAL_TOKENS, SPECIAL_TOKEN_IDS, strict=True):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token!r} is not at id {token_id}")
    return tokenizer


def init_weights(config: Mapping[str, Any], *, seed: int) -> dict[str, torch.Tensor]:
    """Draw fp32 weights for ``config`` with HF ``LlamaForCausalLM`` tensor names.

    Tensors are drawn in a fixed order from one CPU ``torch.Generator`` seeded with
    ``seed``, so the result depends only on ``config`` and ``seed``. Linear and embedding
    weights ~ N(0, WEIGHT_STD), ``lm_head`` ~ N(0, LM_HEAD_STD), norms ~ 1 + N(0,
    NORM_WEIGHT_NOISE_STD). Linear weights are ``[out_features, in_features]``.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float32)
        return out.normal_(mean, std, generator=generator)

    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config["head_dim"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    vocab = config["vocab_size"]

    weights = {"model.embed_tokens.weight": normal((vocab, hidden), WEIGHT_STD)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights[f"{p}.input_layernorm.weight"] = normal((hidden,), NORM_WEIGHT_NOISE_STD, 1.0)
        weights[f"{p}.self_attn.q_proj.weight"] = normal((q_size, hidden), WEIGHT_STD)
        weights[f"{p}.self_attn.k_proj.weight"] = normal((kv_size, hidden), WEIGHT_STD)
        weights[f"{p}.self_attn.v_proj.weight"] = normal((kv_size, hidden), WEIGHT_STD)
        weights[f"{p}.self_attn.o_proj.weight"] = normal((hidden, q_size), WEIGHT_STD)
        weights[f"{p}.post_attention_layernorm.weight"] = normal(
            (hidden,), NORM_WEIGHT_NOISE_STD, 1.0
        )
        weights[f"{p}.mlp.gate_proj.weight"] = normal((inter, hidden), WEIGHT_STD)
        weights[f"{p}.mlp.up_proj.weight"] = normal((inter, hidden), WEIGHT_STD)
        weights[f"{p}.mlp.down_proj.weight"] = normal((hidden, inter), WEIGHT_STD)
    weights["model.norm.weight"] = normal((hidden,), NORM_WEIGHT_NOISE_STD, 1.0)
    weights["lm_head.weight"] = normal((vocab, hidden), LM_HEAD_STD)
    return weights


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in obj.items()}
    path.write_text(json.dumps(plain, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_model_files(model_dir: Path, *, seed: int) -> None:
    """Write every checkpoint file into the existing, empty ``model_dir``."""
    _write_json(model_dir / "config.json", DEFAULT_MODEL_CONFIG)
    _write_json(
        model_dir / "generation_config.json",
        {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "do_sample": False},
    )
    logger.info("drawing weights (seed=%d)", seed)
    save_file(
        init_weights(DEFAULT_MODEL_CONFIG, seed=seed),
        str(model_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    logger.info("training byte-level BPE tokenizer (vocab %d)", VOCAB_SIZE)
    train_tokenizer().save(str(model_dir / "tokenizer.json"), pretty=True)
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    _write_json(model_dir / "special_tokens_map.json", special_tokens)
    _write_json(
        model_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_tokens,
            "model_max_length": MAX_POSITION_EMBEDDINGS,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(model_dir / MARKER_FILE_NAME, {"recipe_version": RECIPE_VERSION, "seed": seed})


def _is_complete(model_dir: Path, *, seed: int) -> bool:
    """True iff ``model_dir`` holds a finished model of this recipe and seed."""
    try:
        marker = json.loads((model_dir / MARKER_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker == {"recipe_version": RECIPE_VERSION, "seed": seed}


def create_default_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Create the default model in ``out_dir`` and return ``out_dir``.

    The files are built in a temporary directory beside ``out_dir`` and renamed into
    place, so other processes see either no ``out_dir`` or a complete one. If ``out_dir``
    already holds a complete model of this recipe and seed (e.g. a concurrent process
    won the race), it is kept and returned. Raises ``FileExistsError`` if ``out_dir``
    exists with anything else in it. Output is byte-identical for equal seeds.
    """
    out_dir = Path(out_dir)
    if _is_complete(out_dir, seed=seed):
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not a default model ({RECIPE_VERSION})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp makes it 0700; the model dir should be readable
        _write_model_files(tmp_dir, seed=seed)
        for path in tmp_dir.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; cached models are shared read-only
        try:
            # Atomic on POSIX; replaces an empty out_dir, fails on a non-empty one.
            os.rename(tmp_dir, out_dir)
        except OSError:
            if not _is_complete(out_dir, seed=seed):
                raise
            logger.info("%s was created concurrently; keeping it", out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("default model ready at %s", out_dir)
    return out_dir


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return the directory of the default model (seed 0), creating it if missing.

    The model lives in ``cache_dir / RECIPE_VERSION`` (by default
    ``~/.cache/preemptserve/default-llama-v1``); a changed recipe bumps
    ``RECIPE_VERSION`` and therefore uses a fresh directory. Safe to call concurrently
    from several processes.
    """
    root = DEFAULT_CACHE_DIR if cache_dir is None else Path(cache_dir)
    return create_default_model(root / RECIPE_VERSION, seed=0)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: write the default model to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to create")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(create_default_model(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
