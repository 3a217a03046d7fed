"""Image tokenizers: LlamaGen's VQ (weight-compatible). The digits tokenizer lives in
:mod:`sarkernels.data`; both share one interface."""
from .vq import PRESETS, VQHandle, VQTokenizer

__all__ = ["VQTokenizer", "VQHandle", "PRESETS"]
