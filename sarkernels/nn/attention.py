"""SetAttention, the drop-in attention module, and KVCache, its in-place cache."""
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from ..checks import integer_tensor
from ..rope import grid_shape, rope_angles, rope_cos_sin, rotate, work_dtype

#: Set id of a cache slot nothing has written: no query's set id reaches it.
UNWRITTEN = torch.iinfo(torch.int64).max


class KVCache(nn.Module):
    """Preallocated K/V ``[B, Hkv, S, D]`` plus the set id of every slot, as buffers of a
    module (``.to()`` moves and casts them; they are in ``state_dict`` only with
    ``persistent=True``: a cache is scratch memory, not a weight).

    Unwritten slots carry :data:`UNWRITTEN` and are invisible to every query, so attention
    reads the whole fixed-size cache: its shapes never change while it fills, which lets a
    decode step be compiled or captured in a CUDA graph. Writes go through
    :func:`sarkernels.kv_cache_append`; re-writing earlier slots is allowed. ``check=False``
    skips the op's slot check (a host sync on CUDA) for callers whose slots are correct by
    construction.
    """

    def __init__(self, batch, heads, max_len, head_dim, dtype=torch.float32, device="cpu",
                 check=True, persistent=False):
        super().__init__()
        k = torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.register_buffer("k", k, persistent=persistent)
        self.register_buffer("v", torch.zeros_like(k), persistent=persistent)
        self.register_buffer("sets", torch.full((batch, max_len), UNWRITTEN, dtype=torch.long,
                                                device=device), persistent=persistent)
        self.check = check

    def reset(self):
        """Forget every slot, keeping the buffers."""
        self.sets.fill_(UNWRITTEN)

    def write(self, k, v, sets=None, slots=0):
        """Writes ``n = k.shape[2]`` tokens with set ids ``sets`` (``[n]`` or ``[B, n]``;
        None: the slots themselves, i.e. causal attention over positions) at ``slots``: an
        int (the first of n consecutive slots, bounds-checked here) or a tensor ``[n]`` or
        ``[B, n]``. Set ids and slots may have any integer dtype but uint64; all is checked
        before anything is written."""
        fn = "KVCache.write"
        b, _, n, _ = k.shape
        if isinstance(slots, numbers.Integral) and not isinstance(slots, bool):
            if slots < 0 or slots + n > self.k.shape[2]:
                raise ValueError(f"{fn}: slots [{slots}, {slots + n}) exceed the cache's "
                                 f"{self.k.shape[2]} slots")
            slots = torch.arange(slots, slots + n, device=self.sets.device)
        slots = self._rows(fn, "slots", slots, b, n)
        sets = slots if sets is None else self._rows(fn, "sets", sets, b, n)
        ops.kv_cache_append(self.k, self.v, k.to(self.k.dtype), v.to(self.v.dtype), slots,
                            check=self.check)
        self.sets.scatter_(1, slots, sets)

    def contents(self):
        """``(k, v, sets)`` of every slot, for attention over the whole cache. Once values
        that require grad were written (and grad mode is on), copies: the next write in place
        would change what this step's backward saved."""
        if torch.is_grad_enabled() and (self.k.requires_grad or self.v.requires_grad):
            return self.k.clone(), self.v.clone(), self.sets.clone()
        return self.k, self.v, self.sets

    def _rows(self, fn, name, t, b, n):
        """``t`` (``[n]`` or ``[B, n]`` integers on the cache's device) as int64 ``[B, n]``."""
        t = integer_tensor(fn, name, t)
        if t.shape not in ((n,), (1, n), (b, n)):
            raise ValueError(f"{fn}: {name} must be [n] or [B, n] = [{b}, {n}], got "
                             f"{list(t.shape)}")
        if t.device != self.sets.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the cache is on "
                             f"{self.sets.device}")
        return t.expand(b, n)


@dataclass
class Rope:
    """2D RoPE cells (``[B, L]``, row-major; -1 zeroes a token) of the queries and, for
    cross-attention, of the context; ``grid_size`` is (H, W) or the side of a square, or
    None with an explicit ``angles`` table (see :func:`sarkernels.rope_2d`).

    A model builds one per forward pass: calling it rotates q or k as :func:`rope_2d` does,
    with the cos/sin tables computed once and shared by every layer (the cells are the
    model's own, valid by construction, so they are not checked).
    """
    grid_size: object
    cells: torch.Tensor
    context_cells: torch.Tensor = None
    angles: torch.Tensor = None
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    def __call__(self, x, context=False):
        """``x [B, H, L, D]`` rotated by the query cells' RoPE (``context``: the context's)."""
        work = work_dtype(x.dtype)
        key = (context, x.shape[-1], work)
        if key not in self._tables:
            cells = self.context_cells if context else self.cells
            angles = self.angles
            if angles is None:
                angles = rope_angles(grid_shape("Rope", self.grid_size), x.shape[-1],
                                     device=cells.device)
            cos, sin = rope_cos_sin(cells, angles, work)
            self._tables[key] = cos[:, None], sin[:, None]
        return rotate(x, *self._tables[key])


class SetAttention(nn.Module):
    """Multi-head attention where key j is visible to query i iff ``sets_k[j] <= sets_q[i]``
    (``strict``: ``<``), computed by :func:`sarkernels.set_attention`.

    ``forward(x, sets)`` is self-attention; with ``context``/``context_sets`` it is
    cross-attention (keys and values from the context). With ``cache`` the new keys and
    values are written to it at ``cache_slots`` (see :meth:`KVCache.write`) and the queries
    attend over the whole cache. ``rope`` (a :class:`Rope`) rotates q and k by the cells'
    2D RoPE. The fused ``wqkv`` stacks q, k, v rows (LlamaGen's layout) for self-attention.
    """

    def __init__(self, dim, num_heads, num_kv_heads=None, qk_norm=False, bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if dim % num_heads or num_heads % self.num_kv_heads:
            raise ValueError(f"SetAttention: dim {dim} must split into {num_heads} heads, a "
                             f"multiple of num_kv_heads {self.num_kv_heads}")
        self.head_dim = dim // num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.wqkv = nn.Linear(dim, dim + 2 * kv_dim, bias=bias)
        self.wo = nn.Linear(dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-5) if qk_norm else None

    def _heads(self, t, heads):
        return t.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def forward(self, x, sets, *, context=None, context_sets=None, strict=False, rope=None,
                cache=None, cache_slots=0):
        dim = self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        if context is None:
            q, k, v = self.wqkv(x).split([dim, kv_dim, kv_dim], -1)
            context_sets = sets
        else:
            if context_sets is None:
                raise ValueError("SetAttention: cross-attention needs context_sets")
            w_q, w_kv = self.wqkv.weight.split([dim, 2 * kv_dim])
            b_q, b_kv = (None, None) if self.wqkv.bias is None else self.wqkv.bias.split([dim, 2 * kv_dim])
            q = nn.functional.linear(x, w_q, b_q)
            k, v = nn.functional.linear(context, w_kv, b_kv).split([kv_dim, kv_dim], -1)
        q, k, v = self._heads(q, self.num_heads), self._heads(k, self.num_kv_heads), \
            self._heads(v, self.num_kv_heads)
        if self.q_norm is not None:  # (CUDA autocast runs the norms in float32)
            q, k = self.q_norm(q).type_as(v), self.k_norm(k).type_as(v)
        if rope is not None:
            q, k = rope(q), rope(k, context=context is not None)
        if cache is not None:
            cache.write(k, v, context_sets, cache_slots)
            k, v, context_sets = cache.contents()
        out = ops.set_attention(q, k, v, sets, context_sets, strict=strict)
        return self.wo(out.transpose(1, 2).flatten(2))
