"""Text <-> token ids with the checkpoint's ``tokenizer.json`` (Hugging Face tokenizers)."""

from __future__ import annotations

import copy
from pathlib import Path

from tokenizers import Tokenizer


class TextTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {model_dir}: convert the tokenizer with "
                "transformers (AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
            )
        self._tokenizer = Tokenizer.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids as ``AutoTokenizer(text).input_ids`` gives them (BOS per the post-processor;
        without it when not ``add_special_tokens``)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas, with stop strings.

    Bytes of one character may span tokens: text is released only once it decodes
    without a replacement character. With stop strings, the last ``len(stop) - 1``
    characters are held back until they can no longer start a stop string, and the
    stop string itself is never sent (vLLM's convention).

    ``echo``: text that leads the output (the prompt, for clients that want it back);
    stop strings are never looked for in it. ``final_only``: nothing is released until
    the request finishes, then the whole text (non-streaming requests).
    """

    # Leading context decoded with each window so spacing rules see the previous token.
    _CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int], stop: tuple[str, ...],
                 echo: str = "", final_only: bool = False):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-self._CONTEXT_TOKENS :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._hold_chars = max((len(s) for s in stop), default=1) - 1
        self.text = echo
        self._num_sent_chars = 0
        self._stop_floor = len(echo)  # stops may only start at or after this character
        self._final_only = final_only

    # What ``export_state`` carries: everything but the tokenizer.
    _STATE = ("_ids", "_prefix_offset", "_read_offset", "_stop", "_hold_chars", "text",
              "_num_sent_chars", "_stop_floor", "_final_only")

    def export_state(self) -> dict[str, object]:
        """Plain data that ``restore`` turns back into this detokenizer (another engine
        continues a moved request's text exactly where this one stopped)."""
        return {name: copy.copy(getattr(self, name)) for name in self._STATE}

    @classmethod
    def restore(cls, tokenizer: TextTokenizer, state: dict[str, object]) -> IncrementalDetokenizer:
        detokenizer = cls.__new__(cls)
        detokenizer._tokenizer = tokenizer
        for name in cls._STATE:
            setattr(detokenizer, name, copy.copy(state[name]))
        return detokenizer

    def append(self, token_id: int) -> None:
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def find_stop(self, enabled: bool = True) -> bool:
        """If a stop string appeared, cut the text before it and return True.

        While not ``enabled`` (``min_length`` not reached yet) stops are ignored, and text
        produced so far can never be cut later: so none of it is held back or lost.
        """
        if not self._stop:
            return False
        if not enabled:
            self._stop_floor = len(self.text)
            return False
        # Only the unsent tail plus a stop's length can hold a new match.
        search_from = max(self._stop_floor, self._num_sent_chars - self._hold_chars)
        cut = min(
            (i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0),
            default=-1,
        )
        if cut < 0:
            return False
        self.text = self.text[:cut]
        return True

    def take_delta(self, finished: bool) -> str:
        """Text not yet sent; holds back a possible stop-string prefix unless finished."""
        if self._final_only and not finished:
            return ""
        held_from = max(self._stop_floor, len(self.text) - self._hold_chars)
        end = len(self.text) if finished else max(self._num_sent_chars, held_from)
        delta = self.text[self._num_sent_chars : end]
        self._num_sent_chars = end
        return delta
