"""SetAttention, the drop-in attention module, and KVCache, its in-place cache."""
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops

#: Set id of a cache slot nothing has written: no query's set id reaches it.
UNWRITTEN = torch.iinfo(torch.int64).max


class KVCache:
    """Preallocated K/V ``[B, Hkv, S, D]`` plus the set id of every slot.

    Unwritten slots carry :data:`UNWRITTEN` and are invisible to every query. Writes go
    through :func:`sarkernels.kv_cache_append` at consecutive slots ``start, start+1, ...``
    (re-writing earlier slots is allowed); attention reads slots ``[0, end)`` only.
    """

    def __init__(self, batch, heads, max_len, head_dim, dtype=torch.float32, device="cpu"):
        self.k = torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.sets = torch.full((batch, max_len), UNWRITTEN, dtype=torch.long, device=device)
        self.end = 0

    def reset(self):
        """Forget every slot, keeping the buffers."""
        self.sets.fill_(UNWRITTEN)
        self.end = 0

    def write(self, k, v, sets, start):
        """Writes ``n = k.shape[2]`` tokens with set ids ``sets [B, n]`` at slots
        ``start .. start+n-1``."""
        n = k.shape[2]
        if start < 0 or start + n > self.k.shape[2]:
            raise ValueError(f"KVCache.write: slots [{start}, {start + n}) exceed the cache's "
                             f"{self.k.shape[2]} slots")
        slots = torch.arange(start, start + n, device=k.device).expand(k.shape[0], n)
        # The slots are in range and distinct by construction: no error-flag sync on CUDA.
        ops.kv_cache_append(self.k, self.v, k.to(self.k.dtype), v.to(self.v.dtype), slots,
                            check=False)
        self.sets[:, start:start + n] = sets
        self.end = max(self.end, start + n)

    def view(self):
        return self.k[:, :, :self.end], self.v[:, :, :self.end], self.sets[:, :self.end]


@dataclass
class Rope:
    """2D RoPE cells (``[B, L]``, row-major; -1 zeroes a token) of the queries and, for
    cross-attention, of the context; ``grid_size`` is (H, W) or the side of a square."""
    grid_size: object
    cells: torch.Tensor
    context_cells: torch.Tensor = None


class SetAttention(nn.Module):
    """Multi-head attention where key j is visible to query i iff ``sets_k[j] <= sets_q[i]``
    (``strict``: ``<``), computed by :func:`sarkernels.set_attention`.

    ``forward(x, sets)`` is self-attention; with ``context``/``context_sets`` it is
    cross-attention (keys and values from the context). With ``cache`` the new keys and
    values are written to it at slots ``cache_start ..`` and the queries attend over all the
    cache has seen. ``rope`` (a :class:`Rope`) rotates q and k by the cells' 2D RoPE.
    The fused ``wqkv`` stacks q, k, v rows (LlamaGen's layout) for self-attention.
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
                cache=None, cache_start=0):
        dim = self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        if context is None:
            q, k, v = self.wqkv(x).split([dim, kv_dim, kv_dim], -1)
            context_sets, k_cells = sets, None if rope is None else rope.cells
        else:
            if context_sets is None:
                raise ValueError("SetAttention: cross-attention needs context_sets")
            w_q, w_kv = self.wqkv.weight.split([dim, 2 * kv_dim])
            b_q, b_kv = (None, None) if self.wqkv.bias is None else self.wqkv.bias.split([dim, 2 * kv_dim])
            q = nn.functional.linear(x, w_q, b_q)
            k, v = nn.functional.linear(context, w_kv, b_kv).split([kv_dim, kv_dim], -1)
            k_cells = None if rope is None else rope.context_cells
        q, k, v = self._heads(q, self.num_heads), self._heads(k, self.num_kv_heads), \
            self._heads(v, self.num_kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = ops.rope_2d(q, rope.cells, rope.grid_size)
            k = ops.rope_2d(k, k_cells, rope.grid_size)
        if cache is not None:
            cache.write(k, v, context_sets, cache_start)
            k, v, context_sets = cache.view()
        out = ops.set_attention(q, k, v, sets, context_sets, strict=strict)
        return self.wo(out.transpose(1, 2).flatten(2))
