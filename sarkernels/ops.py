"""The public ops: argument checks, backend choice, fake impls and autograd.

Backends (:func:`use_backend`, per thread and task):

- ``"auto"`` (default): ``torch.ops.sarkernels`` (the compiled kernels of
  ``sarkernels._C``) where it has kernels for the tensors' device, the pure-PyTorch
  reference otherwise;
- ``"kernels"``: the compiled kernels, an error where there are none;
- ``"reference"``: the pure-PyTorch references;
- ``"simt"``: ``torch.ops.sarkernels_simt``, the CUDA kernels run on CPU tensors by the SIMT
  executor of ``sarkernels._simt`` (built with ``SARKERNELS_SIMT=1``).

Where a backend has no backward kernel for set_attention, the backward recomputes the
reference under autograd. :func:`backends`
says what is compiled and usable and, per op, what runs. Checks that need only shapes,
dtypes and devices happen here (they trace under ``torch.compile``; the shared rules are in
:mod:`sarkernels.checks`); checks of values (slots, positions) happen inside the kernels and
the reference, and kv_cache_append's checks of memory in an op of their own that a compiled
graph runs as eager code does.
"""
import contextlib
import contextvars
import importlib

import torch

from . import reference
from .checks import flag, float_tensor, integer, integer_tensor, real
from .rope import check_angles, grid_shape, rope_2d, rotate_instruction

__all__ = ["set_attention", "kv_cache_append", "interleave_position_instructions", "rope_2d",
           "use_backend", "current_backend", "backends", "build_info"]


def _load(name):
    """The compiled module `name` and None, or None and why it did not load."""
    try:
        return importlib.import_module(f".{name}", __package__), None
    except ImportError as exc:  # the package still works on the reference path
        return None, f"{type(exc).__name__}: {exc}"


_C, LOAD_ERROR = _load("_C")
_simt, SIMT_LOAD_ERROR = _load("_simt")

_OPS = ("set_attention", "set_attention_backward", "kv_cache_append",
        "interleave_position_instructions", "interleave_position_instructions_backward")
# set_attention_backward may be missing: the reference recompute stands in for it.
_REQUIRED = tuple(op for op in _OPS if op != "set_attention_backward")


def _limits_text(limits):
    """'256 for float16/bfloat16/float32, 128 for float64' from {dtype name: head dim}."""
    by_dim = {}
    for dtype, dim in limits.items():
        by_dim.setdefault(dim, []).append(dtype)
    return ", ".join(f"{dim} for {'/'.join(dtypes)}" for dim, dtypes in by_dim.items())


# Which kernel set_attention runs (the rule lives in csrc/kernel_ops.h), with the fused
# kernels' head-dim limits as built (csrc/include/sarkernels/attention_limits.h).
_FUSED_LIMITS = next((dict(m.attention_max_head_dim) for m in (_C, _simt)
                      if hasattr(m, "attention_max_head_dim")), None)
ATTENTION_RULE = ("cpu: the CPU kernels, forward and backward; cuda and simt: the split-KV "
                  "decode kernel for at most 16 queries or a head dim the fused kernel lacks, "
                  "the fused training kernel otherwise (head dims multiples of 8 up to "
                  + (_limits_text(_FUSED_LIMITS) if _FUSED_LIMITS else "a limit unknown here: "
                     "no fused kernels built")
                  + "); backward: the fused backward kernel there (deterministic dQ under "
                  "torch.use_deterministic_algorithms), the reference recompute for other "
                  "head dims")
# Implementation backends: op namespace, dispatch key, loaded module, load error.
_IMPLS = {"cpu": ("sarkernels", "CPU", _C, LOAD_ERROR),
          "cuda": ("sarkernels", "CUDA", _C, LOAD_ERROR),
          "simt": ("sarkernels_simt", "CPU", _simt, SIMT_LOAD_ERROR)}


def _has_kernel(ns, op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{op}", key)


def _compiled(impl):
    ns, key, module, _ = _IMPLS[impl]
    return module is not None and all(_has_kernel(ns, op, key) for op in _REQUIRED)


_KERNEL_DEVICES = frozenset(dev for dev in ("cpu", "cuda") if _compiled(dev))
_backend = contextvars.ContextVar("sarkernels_backend", default="auto")
BACKENDS = ("auto", "kernels", "reference", "simt")


def backends():
    """Per implementation backend (reference, cpu, cuda, simt): whether it is compiled and
    usable here, why not, and per op whether a ``"kernel"`` or the ``"reference"`` runs."""
    out = {"reference": {"compiled": True, "usable": True, "why_not": None,
                         "ops": {op: "reference" for op in _OPS}}}
    for impl, (ns, key, module, error) in _IMPLS.items():
        compiled = _compiled(impl)
        if module is None:
            why = f"sarkernels.{'_simt' if impl == 'simt' else '_C'} did not load ({error})"
            if impl == "simt":
                why += "; build with SARKERNELS_SIMT=1"
        elif not compiled:
            why = (f"_C was built without {impl} kernels (no nvcc or a CPU-only torch at "
                   "build time)")
        elif impl == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device visible"
        else:
            why = None
        ops = {op: "kernel" if compiled and _has_kernel(ns, op, key) else "reference"
               for op in _OPS}
        out[impl] = {"compiled": compiled, "usable": why is None, "why_not": why, "ops": ops}
    return out


def build_info():
    """What ``sarkernels._C`` was built with and against, or None if it did not load."""
    return dict(_C.build_info) if _C is not None else None


@contextlib.contextmanager
def use_backend(name):
    """Within the block (this thread or task only), run every op with ``name``: one of
    ``"auto"``, ``"kernels"``, ``"reference"`` or ``"simt"`` (see the module docstring).

    A ``torch.compile``d graph keeps the backend it was traced under; call
    ``torch.compiler.reset()`` before compiling under another one."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {', '.join(map(repr, BACKENDS))}, "
                         f"got {name!r}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend():
    """The backend :func:`use_backend` selected in this thread/task (``"auto"`` outside)."""
    return _backend.get()


def _backend_name():
    return _backend.get()


# Dynamo cannot trace ContextVar.get: a compiled graph takes the backend current when it
# was traced. The mark is torch.compiler.assume_constant_result's, set without calling it:
# it imports torch._dynamo, two seconds of every process's start (test_compile checks that
# Dynamo still reads the mark).
_backend_name._dynamo_marked_constant = True


def _ops_for(device):
    """The op namespace that runs on `device` tensors now, or None for the reference."""
    name = _backend_name()
    if name == "reference":
        return None
    if name == "simt":
        if _simt is None:
            raise RuntimeError("sarkernels: simt backend requested but sarkernels._simt is not "
                               f"built (set SARKERNELS_SIMT=1 when building): {SIMT_LOAD_ERROR}")
        if device.type != "cpu":
            raise RuntimeError(f"sarkernels: the simt backend runs on CPU tensors, got "
                               f"{device.type} tensors")
        return torch.ops.sarkernels_simt
    if device.type in _KERNEL_DEVICES:
        return torch.ops.sarkernels
    if name == "kernels":
        why = LOAD_ERROR or f"sarkernels._C has no {device.type} kernels"
        raise RuntimeError(f"sarkernels: kernels backend requested for {device.type} tensors "
                           f"but unavailable ({why})")
    return None


# ---------------------------------------------------------------- argument checks

def _shape(t):
    return list(t.shape)


def _check_rank(fn, name, t, rank, layout):
    if t.dim() != rank:
        raise ValueError(f"{fn}: {name} must be {rank}-D {layout}, got shape {_shape(t)}")


def _check_device(fn, named):
    first_name, first = named[0]
    for name, t in named[1:]:
        if t is not None and t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}")


def head_dim_ok(d):
    """Whether set attention takes head dim ``d``: a multiple of 8 in [8, 256]."""
    return d % 8 == 0 and 8 <= d <= 256


def _check_attention(q, k, v, q_sets, k_sets):
    """The set ids as int64, after checking every tensor."""
    fn = "set_attention"
    float_tensor(fn, "q", q)
    float_tensor(fn, "k", k, q.dtype)
    float_tensor(fn, "v", v, q.dtype)
    q_sets, k_sets = integer_tensor(fn, "q_sets", q_sets), integer_tensor(fn, "k_sets", k_sets)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_rank(fn, name, t, 4, "[B, H, L, D]")
    _check_device(fn, [("q", q), ("k", k), ("v", v), ("q_sets", q_sets), ("k_sets", k_sets)])
    b, hq, lq, d = q.shape
    q_sets = _batch_ids(fn, "q_sets", q_sets, b, "Lq")
    k_sets = _batch_ids(fn, "k_sets", k_sets, b, "Lk")
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have one shape, got {_shape(k)} and {_shape(v)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{fn}: k must be [B={b}, Hkv, Lk, D={d}] like q, got {_shape(k)}")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"{fn}: q's {hq} heads must be a multiple of k's {k.shape[1]} heads")
    if not head_dim_ok(d):
        raise ValueError(f"{fn}: head dim D must be a multiple of 8 in [8, 256], got {d}")
    if q_sets.shape != (b, lq):
        raise ValueError(f"{fn}: q_sets must be [B, Lq] = [{b}, {lq}] (or [Lq]), got "
                         f"{_shape(q_sets)}")
    if k_sets.shape != (b, k.shape[2]):
        raise ValueError(f"{fn}: k_sets must be [B, Lk] = [{b}, {k.shape[2]}] (or [Lk]), got "
                         f"{_shape(k_sets)}")
    return q_sets, k_sets


def _batch_ids(fn, name, ids, b, length):
    """Set ids ``[B, L]``, from ``[B, L]`` or ``[L]`` (one row of ids shared by the batch,
    expanded without a copy)."""
    if ids.dim() == 1:
        return ids.expand(b, -1)
    if ids.dim() != 2:
        raise ValueError(f"{fn}: {name} must be 2-D [B, {length}] or 1-D [{length}], got shape "
                         f"{_shape(ids)}")
    return ids


def _check_caches(fn, k_cache, v_cache):
    """What makes a tensor unwritable in place, from its metadata alone (it traces)."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.is_leaf and t.requires_grad:
            raise ValueError(f"{fn}: {name} is a leaf tensor that requires grad, which an "
                             f"in-place write would corrupt; pass a cache that does not "
                             f"require grad")
        shared = [dim for dim, (n, st) in enumerate(zip(t.shape, t.stride())) if st == 0 and n > 1]
        if shared:
            raise ValueError(f"{fn}: {name} has stride 0 on dim {shared[0]} (an expanded "
                             f"tensor, strides {list(t.stride())}): its slots share memory; "
                             f"pass a cache with memory of its own, e.g. {name}.contiguous()")


def _extent(t):
    """The byte range ``[start, end)`` a non-empty tensor's elements lie in."""
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (span + 1) * t.element_size()


def _overlap(a, b):
    """Whether ``a`` and ``b`` may share memory: exact for two views of one layout (K and V
    interleaved in one buffer, e.g. the halves of a [B, L, 2, H, D] one), else whether their
    byte ranges meet."""
    if not a.numel() or not b.numel():
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    if not (a0 < b1 and b0 < a1):
        return False
    size = a.element_size()
    if (a.shape, a.stride(), size) != (b.shape, b.stride(), b.element_size()) or (b0 - a0) % size:
        return True
    return _reachable((b0 - a0) // size, [(n, st) for n, st in zip(a.shape, a.stride()) if n > 1])


def _reachable(delta, dims):
    """Whether two elements of one layout (``dims``: (size, stride) pairs) lie ``delta``
    elements apart: delta = sum c_i stride_i for some |c_i| < size_i. Where each stride
    exceeds the reach of the smaller ones (a layout without self-overlap), only the floor
    and the ceiling of the remainder over a stride can lead to a solution, so the search is
    2^ndim at most; any other layout counts as reachable."""
    dims = sorted(dims, key=lambda d: -d[1])
    reach = 0
    for n, st in reversed(dims):
        if st <= reach:
            return True
        reach += (n - 1) * st

    def search(r, i):
        if i == len(dims):
            return r == 0
        n, st = dims[i]
        return any(abs(c) < n and search(r - c * st, i + 1) for c in {r // st, -(-r // st)})

    return search(delta, 0)


@torch.library.custom_op("sarkernels::kv_cache_append_checks", mutates_args=())
def _checked_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, slots: torch.Tensor, check_slots: bool) -> torch.Tensor:
    """A copy of ``slots`` for the write to read, after kv_cache_append's checks of what only
    the real tensors tell (memory, inference mode and, with ``check_slots``, the slot values).
    An op that torch.compile does not trace into: the checks run whenever the write runs,
    eagerly or in a compiled graph, where tracing has none of that to read; the write reading
    its result keeps the op in the graph."""
    fn = "kv_cache_append"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(f"{fn}: {name} is an inference tensor (made under "
                             f"torch.inference_mode()), which PyTorch allows to be written only "
                             f"in inference mode; write it there or pass {name}.clone()")
    if _overlap(k_cache, v_cache):
        raise ValueError(f"{fn}: k_cache and v_cache overlap in memory (the same tensor or "
                         f"views of one buffer); each cache needs its own memory")
    for name, t in (("k", k), ("v", v)):
        for cache_name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if _overlap(t, cache):
                raise ValueError(f"{fn}: {name} overlaps {cache_name} in memory (a view of "
                                 f"its buffer): the write could overwrite values it has still "
                                 f"to read; pass {name}.clone()")
    if check_slots:
        reference.check_slots(slots, k_cache.shape[2])
    return slots.clone()


@_checked_slots.register_fake
def _(k_cache, v_cache, k, v, slots, check_slots):
    return torch.empty_like(slots)


# ---------------------------------------------------------------- set attention

def set_attention(q, k, v, q_sets, k_sets, *, strict=False, scale=None, return_lse=False):
    """Attention where key j is visible to query i iff ``k_sets[b, j] <= q_sets[b, i]``
    (``strict=True``: ``<``).

    q ``[B, Hq, Lq, D]``, k and v ``[B, Hkv, Lk, D]`` (``Hq % Hkv == 0``: GQA/MQA), set ids
    ``[B, Lq]`` and ``[B, Lk]`` (or ``[Lq]`` and ``[Lk]``, shared by every batch row) of any
    integer dtype but uint64, in any order. ``scale``
    defaults to ``1/sqrt(D)``. A query with no visible key, or whose visible logits are all
    ``-inf``, outputs zeros (lse ``-inf``, zero gradient for its q). Otherwise a NaN or ``+inf``
    visible logit, or a NaN/inf in the value of a key it sees, makes its whole output row
    and its lse NaN; keys a query does not see never change its row. Likewise backward: a
    NaN/inf in a query's q, or in the k or v of a key it sees, reaches only that query's dq
    and those keys' dk/dv.
    Returns ``out [B, Hq, Lq, D]`` in q's dtype, or ``(out, lse)`` with ``lse [B, Hq, Lq]``
    in float32 (float64 for float64 inputs). Differentiable in q, k, v (and through lse).
    """
    q_sets, k_sets = _check_attention(q, k, v, q_sets, k_sets)
    flag("set_attention", "strict", strict)
    flag("set_attention", "return_lse", return_lse)
    scale = q.shape[-1] ** -0.5 if scale is None else real("set_attention", "scale", scale)
    ops = _ops_for(q.device)
    if ops is not None:
        out, lse = ops.set_attention(q, k, v, q_sets, k_sets, strict, scale)
    else:
        out, lse = reference.set_attention(q, k, v, q_sets, k_sets, strict, scale)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------- kv cache

def kv_cache_append(k_cache, v_cache, k, v, slots, *, check=True):
    """Writes ``k_cache[b, :, slots[b, i]] = k[b, :, i]`` and the same for v, in place.

    Caches ``[B, Hkv, S, D]``, k and v ``[B, Hkv, n, D]``, slots ``[B, n]`` of any integer
    dtype but uint64. A slot outside ``[0, S)`` or repeated within a row raises ValueError
    and nothing is written. Overwriting slots written by earlier calls is allowed. The
    caches must not be leaves that require grad, expanded (stride 0), inference tensors
    outside inference mode, or share memory (views of one buffer that interleave K and V,
    as a [B, S, 2, H, D] one's halves, are fine: elements are compared where the views
    share a layout, byte ranges otherwise); k and v must not overlap the caches (pass a
    copy to move slots within a cache): each raises ValueError, eagerly and under
    torch.compile alike. Meta tensors are checked for shapes only. Returns None. Where k
    or v requires grad (and grad mode is on), the write is recorded by autograd: gradients
    through the caches reach k and v.

    ``check``: on CUDA tensors, reading the kernel's error flag costs a device-to-host copy
    (a sync); ``check=False``, and any call while a CUDA graph is being captured, skips it:
    a bad slot then writes nothing but raises nothing. The compiled CPU and simt kernels
    check for free, always; the reference backend checks only with ``check=True`` (the
    check reads values on the host).
    """
    fn = "kv_cache_append"
    float_tensor(fn, "k_cache", k_cache)
    for name, t in (("v_cache", v_cache), ("k", k), ("v", v)):
        float_tensor(fn, name, t, k_cache.dtype)
    slots = integer_tensor(fn, "slots", slots)
    flag(fn, "check", check)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        _check_rank(fn, name, t, 4, "[B, H, L, D]")
    _check_rank(fn, "slots", slots, 2, "[B, n]")
    _check_device(fn, [("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                       ("slots", slots)])
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{fn}: v_cache {_shape(v_cache)} must match k_cache {_shape(k_cache)}")
    b, h, _, d = k_cache.shape
    for name, t in (("k", k), ("v", v)):
        if (t.shape[0], t.shape[1], t.shape[3]) != (b, h, d) or t.shape != k.shape:
            raise ValueError(f"{fn}: {name} must be [B={b}, H={h}, n, D={d}] (k and v alike), "
                             f"got {_shape(t)}")
    if slots.shape != (b, k.shape[2]):
        raise ValueError(f"{fn}: slots must be [B, n] = [{b}, {k.shape[2]}], got {_shape(slots)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{fn}: caches must have a unit stride on their last dim")
    _check_caches(fn, k_cache, v_cache)
    ops = _ops_for(k_cache.device)
    if ops is not None and torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        # The kernels write outside autograd; the reference's in-place indexing records the
        # write, so gradients reach k and v through the caches (checked as the kernels do).
        ops, check = None, True
    # the kernels check their slots themselves
    slots = _checked_slots(k_cache, v_cache, k, v, slots, check and ops is None)
    if ops is not None:
        ops.kv_cache_append(k_cache, v_cache, k, v, slots, check)
    else:
        reference.kv_cache_append(k_cache, v_cache, k, v, slots)


# ---------------------------------------------------------------- interleave

def interleave_position_instructions(tokens, positions, instruction, *, num_heads=None,
                                     grid_size=None, rope_base=10000.0, prefix=None,
                                     merge=False, check=True, rope_angles=None):
    """Builds RandAR's ``[prefix, instr_0, tok_0, instr_1, tok_1, ...]`` (``merge=False``,
    ``[B, C + 2N, D]``) or RAR's target-aware ``[prefix + instr_0 on its last row,
    tok_0 + instr_1, ..., tok_(N-1)]`` (``merge=True``, ``[B, C + N, D]``).

    tokens ``[B, N, D]`` in generation order; positions ``[B, N]`` their cells ``r * W + c``.
    instruction: a table ``[P, D]`` gathered by position, or one shared vector ``[D]``
    rotated per head (``num_heads``) by the 2D RoPE of the cell (needs
    ``grid_size=(H, W)`` or an int for a square grid). Differentiable in tokens, instruction
    and prefix. Positions outside the table/grid raise ValueError; ``check`` is
    :func:`kv_cache_append`'s (``check=False`` on CUDA: no sync, and a bad position gives a
    meaningless result instead of an error).

    ``rope_angles`` (instead of ``grid_size``, with a vector instruction): an explicit table
    ``[P, D / num_heads / 2]`` of rotation angles per position (:func:`sarkernels.rope.
    rope_angles`; resolution extrapolation's fractional positions). The instruction is
    rotated once per table row by :func:`rope_2d` and then gathered like a table
    instruction ``[P, D]``, so positions must lie in ``[0, P)``.
    """
    fn = "interleave_position_instructions"
    float_tensor(fn, "tokens", tokens)
    float_tensor(fn, "instruction", instruction, tokens.dtype)
    positions = integer_tensor(fn, "positions", positions)
    rope_base = real(fn, "rope_base", rope_base, above=0, finite=True)
    flag(fn, "merge", merge)
    flag(fn, "check", check)
    _check_rank(fn, "tokens", tokens, 3, "[B, N, D]")
    _check_rank(fn, "positions", positions, 2, "[B, N]")
    _check_device(fn, [("tokens", tokens), ("positions", positions),
                       ("instruction", instruction), ("prefix", prefix)])
    b, n, d = tokens.shape
    if positions.shape != (b, n):
        raise ValueError(f"{fn}: positions must be [B, N] = [{b}, {n}], got {_shape(positions)}")
    if prefix is not None:
        float_tensor(fn, "prefix", prefix, tokens.dtype)
        _check_rank(fn, "prefix", prefix, 3, "[B, C, D]")
        if (prefix.shape[0], prefix.shape[2]) != (b, d):
            raise ValueError(f"{fn}: prefix must be [B={b}, C, D={d}], got {_shape(prefix)}")
    if merge and n and (prefix is None or prefix.shape[1] == 0):
        raise ValueError(f"{fn}: merge=True adds instr_0 to the last prefix row, so it needs a "
                         "prefix with at least one row")
    if rope_angles is not None:
        instruction = _instruction_table(fn, instruction, rope_angles, num_heads, grid_size, d)
    if grid_size is not None:
        grid_size = grid_shape(fn, grid_size)
    if instruction.dim() == 2:
        if instruction.shape[1] != d:
            raise ValueError(f"{fn}: a table instruction must be [P, D={d}], got "
                             f"{_shape(instruction)}")
        num_heads, grid = 0, (0, 0)
    elif instruction.dim() == 1:
        if instruction.shape[0] != d:
            raise ValueError(f"{fn}: a vector instruction must be [D={d}], got {_shape(instruction)}")
        if num_heads is None or grid_size is None:
            raise ValueError(f"{fn}: a vector instruction is rotated by 2D RoPE and needs "
                             "num_heads and grid_size")
        _check_heads(fn, d, num_heads)
        grid = grid_size
    else:
        raise ValueError(f"{fn}: instruction must be a table [P, D] or a vector [D], got shape "
                         f"{_shape(instruction)}")
    ops = _ops_for(tokens.device)
    if ops is not None:
        return ops.interleave_position_instructions(
            tokens, positions, instruction, prefix, num_heads, grid[0], grid[1],
            rope_base, merge, check)
    return reference.interleave_position_instructions(
        tokens, positions, instruction, num_heads, grid_size, rope_base, prefix, merge, check)


def _check_heads(fn, d, num_heads):
    if d % (4 * integer(fn, "num_heads", num_heads, 1)):
        raise ValueError(f"{fn}: D={d} must split into num_heads={num_heads} heads of a "
                         "multiple of 4")


def _instruction_table(fn, instruction, angles, num_heads, grid_size, d):
    """The vector instruction rotated by every row of an explicit angle table: ``[P, D]``."""
    if instruction.dim() != 1 or grid_size is not None or num_heads is None:
        raise ValueError(f"{fn}: rope_angles rotates a vector instruction [D]: pass num_heads "
                         f"and no grid_size (got instruction {_shape(instruction)}, "
                         f"grid_size={grid_size}, num_heads={num_heads})")
    _check_heads(fn, d, num_heads)
    check_angles(fn, angles, d // num_heads, "rope_angles")
    _check_device(fn, [("instruction", instruction), ("rope_angles", angles)])
    rows = torch.arange(angles.shape[0], device=instruction.device)[None]
    return rotate_instruction(instruction, rows, num_heads, angles=angles)[0]


# ---------------------------------------------------------------- registration

def _dispatch_key(device):
    return "CUDA" if device.type == "cuda" else "CPU"


def _recompute_attention_backward(dout, dlse, q, k, v, q_sets, k_sets, strict, scale):
    """set_attention's gradients through the reference's autograd, for backends without a
    backward kernel."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse = reference.set_attention(*leaves, q_sets, k_sets, strict, scale)
        outputs, grads = ((out, lse), (dout, dlse)) if dlse is not None else ((out,), (dout,))
        got = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(got, leaves))


def _fused_backward_covers(module, q):
    """Whether `module`'s fused backward (_C with CUDA, _simt) takes q's head dim (a multiple
    of 8: set_attention checked it)."""
    return q.shape[-1] <= module.attention_max_head_dim[str(q.dtype).removeprefix("torch.")]


def _register(ns):
    """Fake impls and autograd of the ops in namespace `ns` (sarkernels, sarkernels_simt)."""
    lib, ops = ns + "::", getattr(torch.ops, ns)

    @torch.library.register_fake(lib + "set_attention")
    def _(q, k, v, q_sets, k_sets, strict, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=reference.work_dtype(q.dtype))

    @torch.library.register_fake(lib + "set_attention_backward")
    def _(dout, dlse, q, k, v, out, lse, q_sets, k_sets, strict, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def attention_setup(ctx, inputs, output):
        q, k, v, q_sets, k_sets, strict, scale = inputs
        ctx.save_for_backward(q, k, v, q_sets, k_sets, *output)
        ctx.strict, ctx.scale = strict, scale

    def attention_backward(ctx, dout, dlse):
        q, k, v, q_sets, k_sets, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        cpu_kernels = ns == "sarkernels" and q.device.type == "cpu"
        module = _simt if ns == "sarkernels_simt" else _C
        if _has_kernel(ns, "set_attention_backward", _dispatch_key(q.device)) and \
                (cpu_kernels or _fused_backward_covers(module, q)):
            dq, dk, dv = ops.set_attention_backward(
                dout, dlse, q, k, v, out, lse, q_sets, k_sets, ctx.strict, ctx.scale)
        else:
            dq, dk, dv = _recompute_attention_backward(dout, dlse, q, k, v, q_sets, k_sets,
                                                       ctx.strict, ctx.scale)
        return dq, dk, dv, None, None, None, None

    torch.library.register_autograd(lib + "set_attention", attention_backward,
                                    setup_context=attention_setup)

    @torch.library.register_fake(lib + "kv_cache_append")
    def _(k_cache, v_cache, k, v, slots, check=True):
        return None

    @torch.library.register_fake(lib + "interleave_position_instructions")
    def _(tokens, positions, instruction, prefix, num_heads, grid_h, grid_w, rope_base, merge,
          check=True):
        b, n, d = tokens.shape
        c = 0 if prefix is None else prefix.shape[1]
        return tokens.new_empty(b, reference.interleave_length(c, n, merge), d)

    @torch.library.register_fake(lib + "interleave_position_instructions_backward")
    def _(grad, positions, instruction, prefix_len, num_heads, grid_h, grid_w, rope_base, merge):
        b, n = positions.shape
        d = grad.shape[2]
        return (grad.new_empty(b, n, d), instruction.new_empty(instruction.shape),
                grad.new_empty(b, prefix_len, d))

    def interleave_setup(ctx, inputs, output):
        tokens, positions, instruction, prefix, *config, _check = inputs
        ctx.save_for_backward(positions, instruction)
        ctx.prefix_len = None if prefix is None else prefix.shape[1]
        ctx.config = config

    def interleave_backward(ctx, grad):
        positions, instruction = ctx.saved_tensors
        num_heads, grid_h, grid_w, rope_base, merge = ctx.config
        g_tokens, g_instruction, g_prefix = ops.interleave_position_instructions_backward(
            grad, positions, instruction, ctx.prefix_len or 0, num_heads, grid_h, grid_w,
            rope_base, merge)
        if ctx.prefix_len is None:
            g_prefix = None
        return g_tokens, None, g_instruction, g_prefix, None, None, None, None, None, None

    torch.library.register_autograd(lib + "interleave_position_instructions",
                                    interleave_backward, setup_context=interleave_setup)


for _ns, _module in (("sarkernels", _C), ("sarkernels_simt", _simt)):
    if _module is not None:
        _register(_ns)
