import pytest
import torch

import sarkernels
from conftest import HAS_KERNELS, HAS_SIMT


class TinyRandAR(torch.nn.Module):
    """Every op in one forward: interleave, 2D RoPE, a KV-cache write and set attention."""

    def __init__(self, dim=32, heads=2, grid=4, cache_len=40):
        super().__init__()
        self.heads, self.grid = heads, grid
        self.instruction = torch.nn.Parameter(torch.randn(dim))
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.register_buffer("k_cache", torch.zeros(1, heads, cache_len, dim // heads))
        self.register_buffer("v_cache", torch.zeros(1, heads, cache_len, dim // heads))

    def forward(self, tokens, positions, cls):
        x = sarkernels.interleave_position_instructions(
            tokens, positions, self.instruction, num_heads=self.heads, grid_size=self.grid,
            prefix=cls)
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        cells = torch.cat([positions.new_full((b, 1), -1), positions.repeat_interleave(2, 1)], 1)
        q, k = sarkernels.rope_2d(q, cells, self.grid), sarkernels.rope_2d(k, cells, self.grid)
        slots = torch.arange(length, device=x.device).expand(b, length)
        sarkernels.kv_cache_append(self.k_cache, self.v_cache, k.detach(), v.detach(), slots)
        order = torch.arange(length, device=x.device).expand(b, length)
        return sarkernels.set_attention(q, k, v, order, order)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param("kernels", marks=pytest.mark.skipif(
    not HAS_KERNELS, reason="sarkernels._C not built")), pytest.param("simt", marks=pytest.mark.skipif(
        not HAS_SIMT, reason="sarkernels._simt not built"))])
def test_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    model = TinyRandAR()
    tokens, cls = torch.randn(1, 6, 32), torch.randn(1, 1, 32)
    positions = torch.randperm(16)[:6][None]
    torch.compiler.reset()  # a compiled graph keeps the backend it was traced under
    with sarkernels.use_backend(backend):
        eager = model(tokens, positions, cls)
        eager_cache = model.k_cache.clone()
        model.k_cache.zero_()
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(tokens, positions, cls)
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(model.k_cache, eager_cache)
        out.sum().backward()  # the backward compiles through the registered autograd
    assert model.instruction.grad is not None and torch.isfinite(model.instruction.grad).all()
