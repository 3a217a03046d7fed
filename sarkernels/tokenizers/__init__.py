"""Image tokenizers: LlamaGen's VQ (weight-compatible). The digits tokenizer lives in
:mod:`sarkernels.data`; both share one interface."""
from .vq import PRESETS, VQTokenizer

__all__ = ["VQTokenizer", "PRESETS"]
