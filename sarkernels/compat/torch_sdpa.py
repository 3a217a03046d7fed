"""``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` run by set attention
wherever its mask is a set mask, and :func:`use_sarkernels_sdpa`, which routes torch's own
name to it."""
import collections
import contextlib
import contextvars
import threading
import weakref

import torch
from torch.nn import functional as F

from .. import ops
from ..checks import FLOATS
from .masks import NotASetMask, _ids, _visible

__all__ = ["sdpa", "use_sarkernels_sdpa", "fallback_counts", "reset_fallback_counts",
           "clear_mask_cache"]

_TORCH_SDPA = F.scaled_dot_product_attention
FALLBACKS = ("sdpa", "error")
_counts = collections.Counter()
_counts_lock = threading.Lock()


class _Refusal(collections.namedtuple("_Refusal", "kind why")):
    """Why a call cannot run on the kernels: ``kind`` counts it, ``why`` explains it."""


def fallback_counts():
    """How many eager :func:`sdpa` calls went to torch's SDPA since the last reset, per
    reason (``{"not a set mask": 3, "dropout": 1}``). A compiled graph decides once, when it
    is traced, and is not counted."""
    with _counts_lock:
        return dict(_counts)


def reset_fallback_counts():
    with _counts_lock:
        _counts.clear()


def _count(kind):
    if not torch.compiler.is_compiling():
        with _counts_lock:
            _counts[kind] += 1


class _Conversions:
    """The set ids of recent masks, per mask tensor: an entry serves while that tensor (or
    the base it views) lives, at the same data pointer and version (every in-place write
    through torch bumps it), so a model that builds its mask once converts it once. Writes
    that bypass the version counter (``.data``, a numpy array or DLPack capsule sharing the
    memory) are not seen: :func:`clear_mask_cache` forgets every entry."""

    def __init__(self, size=32):
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get(self, mask, extra, convert):
        try:
            version = mask._version
        except RuntimeError:  # an inference tensor keeps no version: nothing to key on
            return convert()
        base = mask if mask._base is None else mask._base
        key = (id(base), mask.data_ptr(), mask.storage_offset(), tuple(mask.shape),
               mask.stride(), mask.dtype, mask.device, extra)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is base and entry[1] == version:
                self._entries.move_to_end(key)
                return entry[2]
        result = convert()
        with self._lock:
            self._entries[key] = (weakref.ref(base), version, result)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return result

    def clear(self):
        with self._lock:
            self._entries.clear()


_conversions = _Conversions()


def clear_mask_cache():
    """Forgets the set ids :func:`sdpa` keeps per mask tensor. Needed only after writing a
    mask's memory behind torch's back (through ``.data``, or a numpy array from
    ``tensor.numpy()`` / ``torch.from_numpy``), which leaves its version unchanged: the next
    call would otherwise reuse the ids of its old values."""
    _conversions.clear()


def _row_sets(mask, rank, lq, lk):
    """Set ids of a bool mask with one row for every query and head (a decode step's
    ``[B, 1, 1, S]``, key padding), or None for other masks. One row is always a set mask
    (kept keys id 0, dropped keys 1, queries 0), so nothing is checked: no host sync, no
    cache, and it traces under torch.compile."""
    m = mask[(None,) * (rank - mask.dim())]
    if mask.dtype != torch.bool or m.shape[-2] != 1 or (rank == 4 and m.shape[1] != 1):
        return None
    k_sets = (~m).reshape(m.shape[0], m.shape[-1]).expand(-1, lk).long()
    q_sets = k_sets.new_zeros(m.shape[0], lq)
    return (q_sets[0], k_sets[0]) if m.shape[0] == 1 else (q_sets, k_sets)


@torch.compiler.disable  # reads data pointers, versions and values: eager code, a graph break
def _mask_sets(mask, rank, lq, lk):
    """Set ids of an SDPA mask broadcast to ``rank``-D inputs with ``lq`` queries and ``lk``
    keys (``[L]``/``[S]`` when the mask has no batch dim), or a _Refusal; cached."""
    return _conversions.get(mask, (rank, lq, lk), lambda: _convert(mask, rank, lq, lk))


def _convert(mask, rank, lq, lk):
    """_mask_sets, uncached, for a mask that broadcasts to the inputs (_plan checked)."""
    m = mask[(None,) * (rank - mask.dim())]
    if rank == 3:
        m = m[:, None]
    m = m.expand(m.shape[0], m.shape[1], lq, lk)
    try:
        q_sets, k_sets = _ids(_visible(m, "sdpa"), m.shape[0] > 1, "attn_mask")
    except NotASetMask as exc:
        return _Refusal("not a set mask", str(exc))
    return q_sets, k_sets


def _plan(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa):
    """``(q_sets, k_sets)`` for set attention to compute this SDPA call, or a _Refusal."""
    if dropout_p != 0:
        return _Refusal("dropout", f"dropout_p={dropout_p}: the kernels have no dropout")
    if attn_mask is not None and is_causal:
        return _Refusal("attn_mask and is_causal", "attn_mask together with is_causal=True")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() not in (3, 4) or \
            k.dim() != q.dim() or v.shape != k.shape or k.shape[0] != q.shape[0] or \
            k.shape[-1] != q.shape[-1]:
        return _Refusal("shape", "the kernels take q [B, (H,) L, D] and k, v of one shape "
                                 "[B, (Hkv,) S, D]")
    if q.dtype not in FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        return _Refusal("dtype", f"q, k, v of dtypes {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device or \
            (attn_mask is not None and attn_mask.device != q.device):
        return _Refusal("device", "inputs on different devices")
    if q.dim() == 4 and k.shape[1] not in (q.shape[1], 1) and \
            not (enable_gqa and q.shape[1] % k.shape[1] == 0):
        return _Refusal("shape", f"{q.shape[1]} query heads and {k.shape[1]} key heads "
                                 f"(enable_gqa={enable_gqa})")
    d = q.shape[-1]
    if not ops.head_dim_ok(d):
        return _Refusal("head dim", f"head dim {d}: the kernels take multiples of 8 up to 256")
    lq, lk = q.shape[-2], k.shape[-2]
    if attn_mask is None:
        if is_causal:  # top-left aligned, as torch: query i sees keys 0..i
            return (torch.arange(lq, device=q.device), torch.arange(lk, device=q.device))
        return (q.new_zeros(lq, dtype=torch.long), q.new_zeros(lk, dtype=torch.long))
    scores = (*q.shape[:-1], lk)  # [B, (H,) L, S]
    if attn_mask.dim() < 2:  # torch's SDPA takes none
        return _Refusal("shape", f"attn_mask must be [L, S] or more dims, got "
                                 f"{list(attn_mask.shape)}")
    if attn_mask.dim() > q.dim() or any(m not in (1, n) for m, n in
                                        zip(reversed(attn_mask.shape), reversed(scores))):
        return _Refusal("shape", f"attn_mask {list(attn_mask.shape)} does not broadcast to "
                                 f"the scores {list(scores)}")
    if attn_mask.dtype not in (torch.bool, torch.float32, q.dtype):  # torch's rule
        return _Refusal("dtype", f"attn_mask of dtype {attn_mask.dtype} with a {q.dtype} query: "
                                 f"SDPA takes a bool mask, a float32 one or one of the query's "
                                 f"dtype")
    if attn_mask.requires_grad:
        return _Refusal("mask requires grad", "attn_mask requires grad; set ids would drop "
                                              "its gradient")
    row = _row_sets(attn_mask, q.dim(), lq, lk)
    return row if row is not None else _mask_sets(attn_mask, q.dim(), lq, lk)


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False, *, fallback="sdpa"):
    """``torch.nn.functional.scaled_dot_product_attention``, same arguments and result, run
    by :func:`sarkernels.set_attention` whenever the call is set attention.

    That is: q ``[B, Hq, L, D]`` or ``[B, L, D]``, k and v of one shape (``Hq % Hkv == 0``
    with ``enable_gqa``, or ``Hkv == 1``), D a multiple of 8 up to 256, ``dropout_p == 0``,
    and no mask, ``is_causal`` (top-left aligned: query i sees keys ``0..i``, as in torch)
    or an ``attn_mask`` that is a set mask (:func:`sarkernels.compat.sets_from_mask`: bool,
    or float of 0 and -inf only, the same for every head; causal, block-causal, prefix-LM,
    key padding). A bool mask with one row for all queries and heads (``[B, 1, 1, S]``: a
    decode step's, key padding) becomes set ids elementwise, with no check and no host sync;
    another mask is converted once per mask tensor (same data pointer and version; see
    :func:`clear_mask_cache` for writes that bypass the version). A float mask must be
    float32 or the query's dtype, as torch requires (else torch's SDPA raises its error).
    A query that may see no key outputs zeros, as torch's SDPA does.

    Any other call goes, with ``fallback="sdpa"``, to torch's SDPA, counted by reason in
    :func:`fallback_counts`; with ``fallback="error"`` it raises ValueError saying why (for a
    mask: the first row whose keys are not nested with an earlier row's).
    Under ``torch.compile``, ``is_causal``, mask-free and one-row bool-mask calls trace whole;
    another ``attn_mask`` is converted in eager code (a graph break, so an error under
    ``fullgraph=True``).
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"sdpa: fallback must be 'sdpa' or 'error', got {fallback!r}")
    plan = _plan(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if isinstance(plan, _Refusal):
        if fallback == "error":
            raise ValueError(f"sdpa: cannot run on set attention: {plan.why}")
        _count(plan.kind)
        return _TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                           enable_gqa=enable_gqa)
    three = query.dim() == 3
    q, k, v = (t[:, None] if three else t for t in (query, key, value))
    out = ops.set_attention(q, k, v, *plan, scale=scale)
    return out[:, 0] if three else out


# ---------------------------------------------------------------- routing torch's name

_policy = contextvars.ContextVar("sarkernels_sdpa", default="off")
_install_lock = threading.Lock()
_previous = None


# Dynamo cannot trace ContextVar.get: a compiled graph keeps the choice current when it
# was traced.
@torch.compiler.assume_constant_result
def _current_policy():
    return _policy.get()


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, enable_gqa=False):
    """What ``torch.nn.functional.scaled_dot_product_attention`` is once
    :func:`use_sarkernels_sdpa` was first entered: :func:`sdpa` within it, the function it
    replaced elsewhere."""
    policy = _current_policy()
    if policy == "off":
        return _previous(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                         enable_gqa=enable_gqa)
    return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                fallback=policy)


def _install():
    """Puts :func:`_routed_sdpa` in torch's place, once for the process: a module attribute
    is global, so the per-thread choice lives in a context variable it reads."""
    global _previous
    with _install_lock:
        if _previous is None:
            _previous = F.scaled_dot_product_attention
            _routed_sdpa.__wrapped__ = _previous
            F.scaled_dot_product_attention = _routed_sdpa


@contextlib.contextmanager
def use_sarkernels_sdpa(fallback="sdpa"):
    """Within the block (or the function it decorates: ``@use_sarkernels_sdpa()``), calls
    of ``torch.nn.functional.scaled_dot_product_attention`` go to :func:`sdpa` with
    ``fallback``, so a model that calls SDPA runs on set attention unmodified.

    Off by default; per thread and task (other threads keep torch's SDPA). The first use
    replaces the module attribute ``F.scaled_dot_product_attention`` for good by a function
    that calls the original outside such blocks; code that imported the name itself
    (``from torch.nn.functional import scaled_dot_product_attention``) before that keeps
    torch's. Under ``torch.compile`` the choice is made when a graph is traced: compile
    inside the block, and call ``torch.compiler.reset()`` before compiling outside it.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"use_sarkernels_sdpa: fallback must be 'sdpa' or 'error', got "
                         f"{fallback!r}")
    _install()
    token = _policy.set(fallback)
    try:
        yield
    finally:
        _policy.reset(token)
