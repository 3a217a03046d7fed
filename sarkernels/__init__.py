"""sarkernels: kernels and models for set-autoregressive image generation.

Ops (compiled kernels where built, pure PyTorch otherwise): :func:`set_attention`,
:func:`kv_cache_append`, :func:`interleave_position_instructions`, :func:`rope_2d`.
``sarkernels.info()`` tells which backends are compiled and usable; ``sarkernels.compat``
runs other projects' SDPA calls and LlamaGen-family models on set attention.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from .ops import (interleave_position_instructions, kv_cache_append, rope_2d, set_attention,
                  use_backend)
from .info import info

__version__ = "0.1.0"
__all__ = ["set_attention", "kv_cache_append", "interleave_position_instructions", "rope_2d",
           "use_backend", "info", "__version__"]
