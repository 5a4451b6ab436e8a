"""Text <-> token tensors of the ``preprocessing`` and ``postprocessing`` models.

Numpy and the checkpoint's ``tokenizer.json`` only, no Triton. Tensors, names and
formats are those of tensorrtllm_backend's models (commit c2e65b88): prompts
``[B, 1]`` -> ids ``[B, L]`` padded with the pad id and lengths ``[B, 1]``; word lists
(``bad_words``, ``stop_words``) -> TensorRT-LLM's ``[B, 2, L]`` format, an empty word
meaning none; ``embedding_bias_words`` / ``_weights`` -> a dense ``[B, vocab]`` bias;
``[B, beams, L]`` ids with their lengths -> one string per sequence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..engine.tokenizer import TextTokenizer
from .protocol import InvalidRequest, text_value

# Inputs of the official preprocessing model that are not implemented, with why.
PREPROCESSING_REJECTED = {
    "DECODER_QUERY": "encoder-decoder models are not supported (ensemble input "
                     "'decoder_text_input')",
    "IMAGE_BYTES": "multimodal models are not supported",
    "IMAGE_URL": "multimodal models are not supported",
    "VIDEO_BYTES": "multimodal models are not supported",
    "PROMPT_TABLE_EXTRA_ID": "prompt tuning (prompt embedding tables) is not supported "
                             "(ensemble input 'prompt_table_extra_id')",
}
PREPROCESSING_INPUTS = ("QUERY", "REQUEST_OUTPUT_LEN", "BAD_WORDS_DICT", "STOP_WORDS_DICT",
                        "EMBEDDING_BIAS_WORDS", "EMBEDDING_BIAS_WEIGHTS", "END_ID",
                        "PAD_ID", *PREPROCESSING_REJECTED)


def parse_flag(text: str, name: str) -> bool:
    """A config.pbtxt boolean (TensorRT-LLM's spellings: true/false, 1/0, yes/no, t/f)."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "y", "t", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "f", "off"):
        return False
    raise ValueError(f"parameter {name}: expected a boolean, got {text!r}")


def resolve_tokenizer_dir(tokenizer_dir: str) -> Path:
    """``default``: the embedded checkpoint (created if missing); else a directory."""
    if tokenizer_dir in ("", "default"):
        from ..model.default_model import ensure_default_model

        return ensure_default_model()
    path = Path(tokenizer_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir!r} is not a directory")
    return path


def _token_name(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: object) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


class TextCodec:
    """The checkpoint's tokenizer with the preprocessing / postprocessing conventions."""

    def __init__(self, model_dir: Path, add_special_tokens: bool = True,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = TextTokenizer(model_dir)
        self.add_special_tokens = add_special_tokens
        self.skip_special_tokens = skip_special_tokens
        self.end_id, self.pad_id = self._special_ids(model_dir)

    def _special_ids(self, model_dir: Path) -> tuple[int, int]:
        """The end id (the tokenizer's ``eos_token``, else ``config.json``'s
        ``eos_token_id``) and the pad id (``pad_token``, else the end id), as the
        official preprocessing reads them."""
        def load(name: str) -> dict:
            path = model_dir / name
            return json.loads(path.read_text()) if path.is_file() else {}

        tokenizer_config, config = load("tokenizer_config.json"), load("config.json")

        def token_id(key: str) -> int | None:
            name = _token_name(tokenizer_config.get(key))
            return None if name is None else self.tokenizer.token_to_id(name)

        end_id = token_id("eos_token")
        if end_id is None:
            end_id = _first_id(config.get("eos_token_id"))
        if end_id is None:
            raise ValueError(f"{model_dir}: no eos_token in tokenizer_config.json and no "
                             "eos_token_id in config.json")
        pad_id = token_id("pad_token")
        if pad_id is None:
            pad_id = _first_id(config.get("pad_token_id"))
        return end_id, end_id if pad_id is None else pad_id

    # -- preprocessing -----------------------------------------------------------------

    def encode_queries(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B, 1]`` prompts -> ids ``[B, L]`` (padded with the pad id), lengths ``[B, 1]``."""
        rows = [self.tokenizer.encode(text_value(query, "QUERY"), self.add_special_tokens)
                for query in queries.reshape(queries.shape[0], -1)[:, 0]]
        if any(not row for row in rows):
            raise InvalidRequest("input 'QUERY' (text_input): a prompt encodes to no tokens")
        width = max(len(row) for row in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = row
        return ids, np.array([[len(row)] for row in rows], dtype=np.int32)

    def word_lists(self, words: np.ndarray | None, size: int, name: str) -> np.ndarray:
        """Per item, a list of words -> ``[B, 2, L]`` int32: the ids of its words one after
        another, and where each ends (padded with 0 and -1). An empty word is no word."""
        if words is None:
            return np.zeros((size, 2, 0), dtype=np.int32)
        flat_ids, ends = [], []
        for row in _rows(words, size, name):
            item_ids: list[int] = []
            item_ends: list[int] = []
            for word in row:
                ids = self.tokenizer.encode(text_value(word, name), add_special_tokens=False)
                if ids:
                    item_ids += ids
                    item_ends.append(len(item_ids))
            flat_ids.append(item_ids)
            ends.append(item_ends)
        width = max(1, *(len(ids) for ids in flat_ids))
        out = np.zeros((size, 2, width), dtype=np.int32)
        out[:, 1, :] = -1
        for index, (ids, item_ends) in enumerate(zip(flat_ids, ends, strict=True)):
            out[index, 0, : len(ids)] = ids
            out[index, 1, : len(item_ends)] = item_ends
        return out

    def embedding_bias(self, words: np.ndarray | None, weights: np.ndarray | None,
                       size: int) -> np.ndarray:
        """Words and weights per item -> a ``[B, vocab]`` bias added to every token of each
        word (``[B, 0]`` without words)."""
        if words is None and weights is None:
            return np.zeros((size, 0), dtype=np.float32)
        if words is None or weights is None:
            raise InvalidRequest("inputs 'embedding_bias_words' and 'embedding_bias_weights' "
                                 "go together")
        word_rows = _rows(words, size, "EMBEDDING_BIAS_WORDS")
        weight_rows = _rows(weights, size, "EMBEDDING_BIAS_WEIGHTS")
        bias = np.zeros((size, self.tokenizer.vocab_size), dtype=np.float32)
        for index, (row_words, row_weights) in enumerate(zip(word_rows, weight_rows,
                                                             strict=True)):
            if len(row_words) != len(row_weights):
                raise InvalidRequest("'embedding_bias_words' and 'embedding_bias_weights' "
                                     "need one weight per word")
            for word, weight in zip(row_words, row_weights, strict=True):
                for token_id in self.tokenizer.encode(text_value(word, "EMBEDDING_BIAS_WORDS"),
                                                      add_special_tokens=False):
                    bias[index, token_id] += float(weight)
        return bias

    def special_ids(self, given: np.ndarray | None, default: int, size: int,
                    name: str) -> np.ndarray:
        """``END_ID`` / ``PAD_ID`` per item ``[B, 1]``: given, else the tokenizer's."""
        if given is None:
            return np.full((size, 1), default, dtype=np.int32)
        if given.dtype.kind not in "iu" or given.size not in (size, 1):
            raise InvalidRequest(f"input '{name}' must hold one INT32 per batch item")
        return np.broadcast_to(given.reshape(-1, 1), (size, 1)).astype(np.int32)

    # -- postprocessing ----------------------------------------------------------------

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """``[B, beams, L]`` ids and ``[B, beams]`` lengths -> ``[B * beams]`` UTF-8 strings."""
        if tokens.ndim == 2:
            tokens = tokens[:, None]
        lengths = lengths.reshape(tokens.shape[0], tokens.shape[1])
        texts = [
            self.tokenizer.decode([int(t) for t in tokens[b, beam, : lengths[b, beam]]],
                                  self.skip_special_tokens).encode("utf-8")
            for b in range(tokens.shape[0]) for beam in range(tokens.shape[1])
        ]
        return np.array(texts, dtype=np.object_)


def check_preprocessing_inputs(inputs: Mapping[str, np.ndarray | None]) -> None:
    for name, reason in PREPROCESSING_REJECTED.items():
        array = inputs.get(name)
        if array is not None and array.size:
            raise InvalidRequest(f"input '{name}' is not supported: {reason}")


def _rows(array: np.ndarray, size: int, name: str) -> list[list]:
    """A ``[B, n]`` (or ``[n]`` for one item) input as B lists."""
    if array.ndim == 1 and size == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] not in (size, 1):
        raise InvalidRequest(f"input '{name}' must be shaped [batch, n], got {array.shape}")
    if array.shape[0] == 1 and size > 1:
        array = np.broadcast_to(array, (size, array.shape[1]))
    return [list(row) for row in array]


class SequenceText:
    """The text the ``tensorrt_llm_bls`` model sends for one sequence.

    ``update(text)`` takes the sequence's whole decoded text so far and returns what to
    send: the new part (or, with ``accumulate``, all of it) and whether a stop word ended
    it. The official BLS's stop-word rule on text: generation ends right after the first
    stop word found at or after ``generation_start`` (the prompt's characters, when the
    text starts with the prompt); the stop word stays in the text. The engine stops on the
    stop words' token ids already; this also catches a word tokenized differently in
    context than alone.
    """

    def __init__(self, stop_words: list[str], generation_start: int = 0,
                 accumulate: bool = False) -> None:
        self._stop_words = [w for w in stop_words if w]
        self._generation_start = generation_start
        self._accumulate = accumulate
        self._sent = ""
        self.stopped = False

    def update(self, text: str) -> str:
        if self.stopped:
            return ""
        cuts = [i + len(w) for w in self._stop_words
                if (i := text.find(w, self._generation_start)) >= 0]
        if cuts:
            text = text[: min(cuts)]
            self.stopped = True
        new = text[len(self._sent):] if text.startswith(self._sent) else text
        self._sent = text
        return text if self._accumulate else new
