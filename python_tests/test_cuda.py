"""CUDA tensors through every op, checked against the float64 CPU reference.

Runs the compiled CUDA kernels where built, the reference fallback otherwise.
Skipped where no CUDA device is present (select with -m cuda).
"""
import pytest
import torch

import sarkernels
from sarkernels import reference
from conftest import attention_inputs, set_ids

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_set_attention_cuda(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = attention_inputs(2, 4, 2, 257, 257, 64, gen)
    sets = set_ids("sorted", 2, 257, gen, num_sets=16)
    exact = reference.set_attention(q, k, v, sets, sets)[0]
    out = sarkernels.set_attention(*(t.to("cuda", dtype) for t in (q, k, v)), sets.cuda(), sets.cuda())
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.double().cpu(), exact, atol=tol, rtol=tol)


def test_kv_cache_and_interleave_cuda():
    k_cache = torch.zeros(2, 2, 8, 16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(2, 2, 3, 16, device="cuda")
    slots = torch.tensor([[0, 5, 2], [7, 1, 3]], device="cuda")
    sarkernels.kv_cache_append(k_cache, v_cache, k, -k, slots)
    assert torch.equal(k_cache[1, :, 7], k[1, :, 0]) and torch.equal(v_cache[0, :, 5], -k[0, :, 1])
    tok, vec = torch.randn(2, 3, 16), torch.randn(16)
    pos = torch.tensor([[0, 4, 8], [3, 2, 1]])
    want = reference.interleave_position_instructions(tok, pos, vec, 2, (3, 3))
    got = sarkernels.interleave_position_instructions(tok.cuda(), pos.cuda(), vec.cuda(),
                                                      num_heads=2, grid_size=3)
    torch.testing.assert_close(got.cpu(), want)
