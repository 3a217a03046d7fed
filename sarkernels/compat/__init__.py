"""Set attention in other projects' models, at three levels: :func:`sdpa` (torch's SDPA,
same signature, on the kernels whenever the mask is a set mask), :func:`use_sarkernels_sdpa`
(torch's own ``F.scaled_dot_product_attention`` routed there within a block) and
:func:`patch_llamagen` (LlamaGen-family attention swapped in place). :func:`sets_from_mask`
turns a mask into set ids, or says which row keeps it from being a set mask."""
from .llamagen import LlamaGenAttention, patch_llamagen
from .masks import NotASetMask, sets_from_mask
from .torch_sdpa import (clear_mask_cache, fallback_counts, reset_fallback_counts, sdpa,
                         use_sarkernels_sdpa)

__all__ = ["sdpa", "use_sarkernels_sdpa", "sets_from_mask", "NotASetMask", "patch_llamagen",
           "LlamaGenAttention", "fallback_counts", "reset_fallback_counts", "clear_mask_cache"]
