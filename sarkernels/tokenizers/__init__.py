"""Image tokenizers: the digits tokenizer and LlamaGen's VQ (weight-compatible), each a
:class:`Tokenizer` (images in [0, 1] on both sides of encode/decode)."""
from .digits import DigitsTokenizer
from .protocol import Tokenizer
from .vq import PRESETS, VQHandle, VQTokenizer


def from_config(config) -> Tokenizer:
    """The tokenizer a ``config()`` describes (as stored with token folders and checkpoints)."""
    if config.get("name") == "digits":
        return DigitsTokenizer(config["grid"])
    if config.get("name") == "vq":
        return VQHandle(config)
    raise ValueError(f"unknown tokenizer {config.get('name')!r}")


__all__ = ["Tokenizer", "DigitsTokenizer", "VQTokenizer", "VQHandle", "PRESETS", "from_config"]
