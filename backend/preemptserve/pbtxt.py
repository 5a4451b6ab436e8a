"""A model's ``config.pbtxt``: its ``parameters`` read, and set in a copy.

Parsed with protobuf's text format and Triton's ``ModelConfig`` message (the one
``tritonclient`` ships, generated from the server's ``model_config.proto``), so comments,
line breaks, escapes and field order are the parser's business, as in the server. No torch;
``tritonclient.grpc`` (grpc, numpy) is imported on first use only, so importing this module
costs nothing.

The served model reads its parameters from Triton's JSON model config, not from here: this
module is for the tools and tests that read or write the repository's files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _parse(text: str, source: str) -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"{source} is not a valid model config: {exc}") from exc


def parse_parameters(text: str, source: str = "config.pbtxt") -> dict[str, str]:
    """``{name: string_value}`` of the ``parameters`` entries in ``text`` (a config.pbtxt).

    Raises ``ValueError`` (naming ``source``) when ``text`` is not a valid model config.
    """
    config = _parse(text, source)
    return {name: value.string_value for name, value in config.parameters.items()}


def read_parameters(path: Path) -> dict[str, str]:
    """``{name: string_value}`` of the ``parameters`` in the config.pbtxt at ``path``."""
    return parse_parameters(Path(path).read_text(), str(path))


def set_parameters(
    text: str, parameters: Mapping[str, str], *, source: str = "config.pbtxt"
) -> str:
    """``text`` (a config.pbtxt) with each of ``parameters`` set (replaced or added).

    The result is the parser's canonical text: the same config, without the comments.
    """
    from google.protobuf import text_format

    config = _parse(text, source)
    for name, value in parameters.items():
        config.parameters[name].string_value = str(value)
    return text_format.MessageToString(config)


__all__ = ["parse_parameters", "read_parameters", "set_parameters"]
