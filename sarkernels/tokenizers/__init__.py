"""Image tokenizers: the digits tokenizer and LlamaGen's VQ (weight-compatible), with one
interface."""
from .digits import DigitsTokenizer
from .vq import PRESETS, VQHandle, VQTokenizer


def from_config(config):
    """The tokenizer a ``config()`` describes (as stored with token folders and checkpoints)."""
    if config.get("name") == "digits":
        return DigitsTokenizer(config["grid"])
    if config.get("name") == "vq":
        return VQHandle(config)
    raise ValueError(f"unknown tokenizer {config.get('name')!r}")


__all__ = ["DigitsTokenizer", "VQTokenizer", "VQHandle", "PRESETS", "from_config"]
