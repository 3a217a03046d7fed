import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sarkernels import reference
from sarkernels.nn import UNWRITTEN, KVCache, Rope, SetAttention


def manual(module, x, sets, context=None, context_sets=None, strict=False):
    """SetAttention written out with the reference mask and SDPA."""
    dim, kv = module.num_heads * module.head_dim, module.num_kv_heads * module.head_dim
    w_q, w_k, w_v = module.wqkv.weight.split([dim, kv, kv])
    src = x if context is None else context
    heads = lambda t, h: t.unflatten(-1, (h, module.head_dim)).transpose(1, 2)
    q = heads(x @ w_q.T, module.num_heads)
    k = heads(src @ w_k.T, module.num_kv_heads).repeat_interleave(module.num_heads // module.num_kv_heads, 1)
    v = heads(src @ w_v.T, module.num_kv_heads).repeat_interleave(module.num_heads // module.num_kv_heads, 1)
    mask = reference.visible(sets, sets if context is None else context_sets, strict)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return module.wo(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_self_and_cross_attention(backend, kv_heads):
    torch.manual_seed(0)
    m = SetAttention(64, 4, kv_heads)
    x, ctx = torch.randn(2, 9, 64), torch.randn(2, 7, 64)
    sets, ctx_sets = torch.randint(1, 4, (2, 9)), torch.randint(0, 3, (2, 7))
    ctx_sets[:, 0] = 0  # every query sees something, as SDPA needs
    torch.testing.assert_close(m(x, sets), manual(m, x, sets), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x, sets, context=ctx, context_sets=ctx_sets, strict=True),
                               manual(m, x, sets, ctx, ctx_sets, True), atol=1e-5, rtol=1e-5)


def test_cache_steps_equal_one_pass(backend):
    torch.manual_seed(1)
    m = SetAttention(32, 2)
    x = torch.randn(2, 10, 32)
    sets = torch.tensor([0, 1, 1, 2, 2, 2, 3, 4, 4, 5]).expand(2, 10)
    cells = torch.randperm(16)[:10].expand(2, 10)
    full = m(x, sets, rope=Rope(4, cells))
    cache = KVCache(2, 2, 16, 16)
    for reuse in range(2):  # reset keeps the buffers and forgets the slots
        cache.reset()
        buffers = cache.k.data_ptr()
        outs = [m(x[:, a:b], sets[:, a:b], rope=Rope(4, cells[:, a:b]), cache=cache,
                  cache_slots=a if a % 2 else torch.arange(a, b))  # an int start or slot ids
                for a, b in ((0, 1), (1, 3), (3, 6), (6, 10))]
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
        assert cache.k.data_ptr() == buffers
        assert torch.equal(cache.sets[:, :10], sets) and (cache.sets[:, 10:] == UNWRITTEN).all()


def test_cached_attention_has_the_gradients_of_one_pass(backend):
    """The cache write is recorded by autograd on every backend (row 7 of issue 28: the
    kernels' write left the K/V projection with exactly zero gradient)."""
    torch.manual_seed(2)
    m = SetAttention(32, 2, 1)
    x = torch.randn(2, 7, 32)
    sets = torch.tensor([0, 1, 1, 2, 3, 3, 4]).expand(2, 7)
    cache = KVCache(2, 1, 9, 16)
    grads = []
    for out in (m(x, sets), torch.cat([m(x[:, a:b], sets[:, a:b], cache=cache, cache_slots=a)
                                       for a, b in ((0, 3), (3, 7))], 1)):
        grads.append(torch.autograd.grad(out.square().sum(), [m.wqkv.weight, m.wo.weight]))
    for one_pass, stepped in zip(*grads):
        assert stepped.abs().sum() > 0
        torch.testing.assert_close(stepped, one_pass, atol=1e-5, rtol=1e-5)
    w_k = grads[1][0][32:48]  # the K projection's rows
    assert w_k.abs().sum() > 0


def test_cache_bounds():
    cache = KVCache(1, 1, 4, 8)
    with pytest.raises(ValueError, match="exceed"):
        cache.write(torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8), torch.zeros(1, 3, dtype=torch.long), 2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
@pytest.mark.parametrize("slots", [1, np.int64(1), torch.tensor([1, 2]), torch.tensor([[1, 2]])],
                         ids=["int", "numpy", "[n]", "[B, n]"])
def test_cache_write_takes_any_integers(backend, dtype, slots):
    cache = KVCache(1, 1, 4, 8)
    if isinstance(slots, torch.Tensor):
        slots = slots.to(dtype)
    cache.write(torch.ones(1, 1, 2, 8), -torch.ones(1, 1, 2, 8), torch.tensor([[3, 200]], dtype=dtype),
                slots)
    assert cache.sets.tolist() == [[UNWRITTEN, 3, 200, UNWRITTEN]]
    assert cache.k[0, 0, :, 0].tolist() == [0, 1, 1, 0] and torch.equal(cache.v, -cache.k)


@pytest.mark.parametrize("change,error,match", [
    (dict(sets=torch.tensor([[3, 4]], dtype=torch.uint64)), TypeError,
     "KVCache.write: sets must be an integer tensor of a dtype other than uint64"),
    (dict(sets=torch.tensor([[3.0, 4.0]])), TypeError, "KVCache.write: sets must be an integer tensor"),
    (dict(sets=torch.tensor([3, 4, 5])), ValueError, r"sets must be \[n\] or \[B, n\] = \[1, 2\], got \[3\]"),
    (dict(sets=torch.tensor([[3, 4]], device="meta")), ValueError, "sets is on meta but the cache is on cpu"),
    (dict(slots=True), TypeError, "KVCache.write: slots must be a tensor, got bool"),
    (dict(slots=torch.tensor([1, 2], dtype=torch.uint64)), TypeError, "slots must be an integer tensor of a"),
])
def test_cache_write_checks_before_writing(backend, change, error, match):
    cache = KVCache(1, 1, 4, 8)
    args = dict(k=torch.ones(1, 1, 2, 8), v=torch.ones(1, 1, 2, 8), sets=torch.tensor([[3, 4]]), slots=1)
    with pytest.raises(error, match=match):
        cache.write(**{**args, **change})
    assert not cache.k.any() and not cache.v.any() and (cache.sets == UNWRITTEN).all()


def test_qk_norm_in_float32_keeps_the_projections_dtype():
    # CUDA autocast runs RMSNorm in float32 while the projections give bfloat16
    attn = SetAttention(32, 2, qk_norm=True).to(torch.bfloat16)
    for norm in (attn.q_norm, attn.k_norm):
        norm.register_forward_hook(lambda mod, args, out: out.float())
    x, sets = torch.randn(2, 5, 32, dtype=torch.bfloat16), torch.arange(5)
    assert attn(x, sets).dtype == torch.bfloat16
