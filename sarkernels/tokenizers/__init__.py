"""Image tokenizers: the digits tokenizer, LlamaGen's VQ and MaskGIT's VQGAN (both
weight-compatible), each a :class:`Tokenizer` (images in [0, 1] on both sides of
encode/decode)."""
from .digits import DigitsTokenizer
from .maskgit_vqgan import MaskGITVQGAN
from .protocol import Tokenizer
from .vq import PRESETS, VQHandle, VQTokenizer, read_state


def load_vq(path, image_size=256):
    """The VQ tokenizer whose weights ``path`` holds, told by its keys: LlamaGen's
    (:class:`VQTokenizer`) or MaskGIT's (:class:`MaskGITVQGAN`)."""
    state = read_state(path, "VQ checkpoint")
    cls = MaskGITVQGAN if isinstance(state, dict) and MaskGITVQGAN.KEY in state else VQTokenizer
    return cls.from_state(state, path, image_size)


def from_config(config) -> Tokenizer:
    """The tokenizer a ``config()`` describes (as stored with token folders and checkpoints)."""
    if config.get("name") == "digits":
        return DigitsTokenizer(config["grid"])
    if config.get("name") == "vq":
        return VQHandle(config)
    if config.get("name") == MaskGITVQGAN.name:
        return VQHandle(config, MaskGITVQGAN.from_checkpoint)
    raise ValueError(f"unknown tokenizer {config.get('name')!r}")


__all__ = ["Tokenizer", "DigitsTokenizer", "VQTokenizer", "MaskGITVQGAN", "VQHandle", "PRESETS",
           "from_config", "load_vq", "read_state"]
