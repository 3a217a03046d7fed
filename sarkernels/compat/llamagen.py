"""LlamaGen-family attention on set attention: :func:`patch_llamagen` swaps the
``Attention`` modules of a LlamaGen (c2i, t2i) or RandAR model in place.

Their ``Attention`` (FoundationVision/LlamaGen ``autoregressive/models/gpt.py``; RandAR's
differs only in taking per-sample ``freqs_cis [B, L, D/2, 2]``) holds ``wqkv``, ``wo``,
``resid_dropout`` and a ``kv_cache`` that the model's ``setup_caches`` assigns, and calls
SDPA with ``is_causal=mask is None``. :class:`LlamaGenAttention` keeps those submodules
(so the weights and ``state_dict`` keys) and the forward signature, and runs the SDPA call
through :func:`sarkernels.compat.sdpa`.
"""
import torch
from torch import nn

from ..nn import KVCache
from ..rope import rotate
from .torch_sdpa import sdpa

__all__ = ["LlamaGenAttention", "patch_llamagen"]

_ATTRIBUTES = ("wqkv", "wo", "dim", "head_dim", "n_head", "n_kv_head", "kv_cache")


def rotate_pairs(x, freqs_cis):
    """LlamaGen's ``apply_rotary_emb`` (``freqs_cis [L, D/2, 2]``) and RandAR's
    ``batch_apply_rotary_emb`` (``[B, L, D/2, 2]``) in one: x ``[B, L, H, D]`` rotated by
    (cos, sin) pairs in float32, returned in x's dtype, with their arithmetic."""
    batch = x.shape[0] if freqs_cis.dim() == 4 else 1
    f = freqs_cis.view(batch, x.shape[1], 1, x.shape[-1] // 2, 2)
    # x rounded to float32 as theirs is, the arithmetic in the table's dtype as theirs is
    return rotate(x.float().type_as(x), f[..., 0], f[..., 1])


def _mirror(cache, heads):
    """A :class:`sarkernels.nn.KVCache` the size of theirs (``k_cache [B, H, S, D]``) but
    with the model's ``heads`` key heads: theirs allocates one per query head, which breaks
    GQA models' generation. Unchecked: LlamaGen writes at ``input_pos`` within the cache its
    ``setup_caches`` sized, and the check would cost a host sync per write on CUDA (a bad
    slot still fails: the CPU kernels check anyway, the slot ids' scatter bounds-checks)."""
    b, _, length, head_dim = cache.k_cache.shape
    return KVCache(b, heads, length, head_dim, cache.k_cache.dtype, cache.k_cache.device,
                   check=False)


class LlamaGenAttention(nn.Module):
    """A LlamaGen-family ``Attention`` on set attention, sharing the original's ``wqkv``,
    ``wo`` and ``resid_dropout``; ``forward(x, freqs_cis=None, input_pos=None, mask=None)``
    as theirs. A cache assigned to ``kv_cache`` (their ``KVCache``, with ``k_cache`` and
    ``v_cache`` buffers, as ``setup_caches`` assigns it) is replaced by an empty
    :class:`sarkernels.nn.KVCache` of the same batch, length, dtype and device, written at
    ``input_pos``; attention reads the whole cache under their mask, as theirs does. A
    decode step's mask (``causal_mask[:bs, None, input_pos]``, one row per sample) becomes
    set ids elementwise, without a check or host sync (see :func:`sarkernels.compat.sdpa`)."""

    def __init__(self, original):
        super().__init__()
        for name in ("dim", "head_dim", "n_head", "n_kv_head"):
            setattr(self, name, getattr(original, name))
        self.attn_dropout_p = getattr(original, "attn_dropout_p", 0.0)
        self.wqkv, self.wo = original.wqkv, original.wo
        self.resid_dropout = getattr(original, "resid_dropout", nn.Identity())
        self.kv_cache = original.kv_cache
        self.train(original.training)

    def __setattr__(self, name, value):
        if name == "kv_cache" and value is not None and not isinstance(value, KVCache):
            value = _mirror(value, self.n_kv_head)
        super().__setattr__(name, value)

    def forward(self, x, freqs_cis=None, input_pos=None, mask=None):
        bsz, seqlen, _ = x.shape
        kv_size = self.n_kv_head * self.head_dim
        xq, xk, xv = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        xq = rotate_pairs(xq.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        xk = rotate_pairs(xk.view(bsz, seqlen, self.n_kv_head, self.head_dim), freqs_cis)
        xv = xv.view(bsz, seqlen, self.n_kv_head, self.head_dim)
        xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))
        if self.kv_cache is not None:
            self.kv_cache.write(xk, xv, slots=input_pos)
            xk, xv, _ = self.kv_cache.contents()
        out = sdpa(xq, xk, xv, attn_mask=mask, is_causal=mask is None, enable_gqa=True,
                   dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(bsz, seqlen, self.dim)))


def _is_theirs(module):
    return not isinstance(module, LlamaGenAttention) and \
        all(hasattr(module, name) for name in _ATTRIBUTES) and isinstance(module.wqkv, nn.Linear)


_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _verify(name, original, patched):
    """One forward of both on random input, causal and under a causal mask with a padded
    key (batch 1: LlamaGen's and RandAR's freqs_cis layouts then agree)."""
    w = original.wqkv.weight
    gen = torch.Generator(device=w.device).manual_seed(0)
    length = 8
    x = torch.randn(1, length, original.dim, generator=gen, device=w.device).to(w.dtype)
    angles = torch.rand(1, length, original.head_dim // 2, generator=gen, device=w.device) * 6
    freqs_cis = torch.stack([angles.cos(), angles.sin()], -1)
    mask = torch.ones(length, length, dtype=torch.bool, device=w.device).tril()
    mask[:, 1] = False
    caches, mode = (original.kv_cache, patched.kv_cache), original.training
    original.kv_cache = patched.kv_cache = None
    try:
        original.eval(), patched.eval()
        with torch.no_grad():
            for m in (None, mask[None, None]):
                want, got = original(x, freqs_cis, None, m), patched(x, freqs_cis, None, m)
                err = (want.double() - got.double()).abs().max().item()
                if not err <= _TOLERANCE.get(w.dtype, 3e-2) * max(1.0, want.abs().max().item()):
                    raise RuntimeError(f"patch_llamagen: {name} differs from the original by "
                                       f"{err:.3g} ({'a mask' if m is not None else 'causal'}, "
                                       f"{w.dtype}); the model was left unpatched")
    finally:
        original.train(mode), patched.train(mode)
        original.kv_cache, patched.kv_cache = caches


def patch_llamagen(model, verify=True):
    """Replaces every LlamaGen-family ``Attention`` in ``model`` (a module with ``wqkv``,
    ``wo``, ``dim``, ``head_dim``, ``n_head``, ``n_kv_head`` and ``kv_cache``: LlamaGen
    c2i/t2i, RandAR) by a :class:`LlamaGenAttention` on the same weights, in place, and
    returns ``model``. Training, ``setup_caches`` and their ``generate`` work as before;
    GQA generation works too (their cache has one head per query head).

    ``torch.compile``: a step with one query per sample (c2i's prefill and every decode
    step, which LlamaGen's ``sample_c2i.py --compile`` compiles with ``fullgraph=True``)
    traces whole (tested with the ``eager`` backend). A prefill of several tokens (t2i's
    caption) converts its mask in eager code, a graph break: under ``fullgraph=True`` it
    raises, so compile only the decode step there (as gpt-fast does).

    ``verify=True`` first runs one forward of each original and its replacement on random
    input (causal, and under a padded causal mask) and raises RuntimeError, leaving the
    model as it was, if they differ by more than rounding. A cache the model already had
    is replaced by an empty one: patch before generating. Masks that are not set masks
    (t2i's prefill with padded text) run on torch's SDPA (see
    :func:`sarkernels.compat.fallback_counts`).
    """
    found = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if _is_theirs(child)]
    if not found and not any(isinstance(m, LlamaGenAttention) for m in model.modules()):
        raise ValueError(f"patch_llamagen: {type(model).__name__} has no LlamaGen-style "
                         f"Attention (a module with {', '.join(_ATTRIBUTES)})")
    patched = [LlamaGenAttention(child) for _, _, child in found]
    if verify:
        names = {id(m): n for n, m in model.named_modules()}
        for (_, _, child), new in zip(found, patched):
            _verify(names[id(child)], child, new)
    for (parent, name, _), new in zip(found, patched):
        setattr(parent, name, new)
    return model
