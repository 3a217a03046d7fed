"""CPU microbenchmarks: each op beside its competitors, same shapes, same process.

Run with `make bench` (writes benchmarks/last.json and prints ratios). Group names carry
the case; the benchmark name says who ran it ("ours" is the compiled sarkernels op).
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import sarkernels
from sarkernels import reference

B, H, L, D = 8, 16, 513, 64


def block_causal(length, set_size):
    """A set-0 class token, then sets of `set_size` tokens (SAR/RandAR training layout)."""
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(length - 1) // set_size + 1])


def random_partition(length, num_sets, gen):
    cuts = torch.randperm(length - 2, generator=gen)[: num_sets - 1].sort().values + 1
    ids = torch.zeros(length - 1, dtype=torch.long)
    ids[cuts] = 1
    return torch.cat([torch.zeros(1, dtype=torch.long), ids.cumsum(0) + 1])


def patterns():
    gen = torch.Generator().manual_seed(0)
    return {
        "block16": block_causal(L, 16).expand(B, L),
        "causal": torch.arange(L).expand(B, L),
        "full": torch.zeros(B, L, dtype=torch.long),
        "partition16": torch.stack([random_partition(L, 16, gen) for _ in range(B)]),
        "unsorted": torch.randint(0, 16, (B, L), generator=gen),
    }


PATTERNS = patterns()


@functools.lru_cache(None)
def qkv():
    return tuple(torch.randn(B, H, L, D) for _ in range(3))


@functools.lru_cache(None)
def flex(pattern):
    """FlexAttention compiled for CPU, or the reason it is unavailable."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    sets = PATTERNS[pattern]
    mask_mod = lambda b, h, qi, ki: sets[b, ki] <= sets[b, qi]
    block_mask = create_block_mask(mask_mod, B, None, L, L, device="cpu")
    fn = torch.compile(flex_attention)
    q, k, v = qkv()
    fn(q, k, v, block_mask=block_mask)
    return lambda: fn(q, k, v, block_mask=block_mask)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("who", ["ours", "sdpa_dense_mask", "sdpa_causal", "flex_compiled"])
def test_set_attention_forward(benchmark, pattern, who):
    benchmark.group = f"set_attention fwd fp32 B{B} H{H} L{L} D{D} {pattern}"
    q, k, v = qkv()
    sets = PATTERNS[pattern]
    if who == "ours":
        fn = lambda: sarkernels.set_attention(q, k, v, sets, sets)
    elif who == "sdpa_dense_mask":
        mask = reference.visible(sets, sets)[:, None]
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif who == "sdpa_causal":
        if pattern != "causal":
            pytest.skip("is_causal only expresses the causal pattern")
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        if pattern not in ("block16", "partition16"):
            pytest.skip("FlexAttention measured on the SAR patterns only (26 s compile each)")
        try:
            fn = flex(pattern)
        except Exception as exc:  # record why instead of failing the run
            pytest.skip(f"FlexAttention did not compile: {type(exc).__name__}: {exc}"[:300])
    benchmark(fn)


@pytest.mark.parametrize("who", ["ours", "sdpa_dense_mask"])
def test_set_attention_forward_backward(benchmark, who):
    benchmark.group = f"set_attention fwd+bwd fp32 B{B} H{H} L{L} D{D} block16"
    q, k, v = (t.clone().requires_grad_() for t in qkv())
    sets = PATTERNS["block16"]
    mask = reference.visible(sets, sets)[:, None]
    attend = (lambda: sarkernels.set_attention(q, k, v, sets, sets)) if who == "ours" else \
        (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    benchmark(lambda: torch.autograd.grad(attend().sum(), (q, k, v)))


@pytest.mark.parametrize("who", ["ours", "sdpa_dense_mask"])
def test_sar_cross_attention(benchmark, who):
    benchmark.group = f"set_attention fwd fp32 cross B{B} H{H} Lq256 Lk257 D{D} strict"
    q = torch.randn(B, H, 256, D)
    _, k, v = (t[:, :, :257] for t in qkv())
    q_sets = torch.arange(256).expand(B, 256) // 16 + 1
    k_sets = block_causal(257, 16).expand(B, 257)
    if who == "ours":
        fn = lambda: sarkernels.set_attention(q, k, v, q_sets, k_sets, strict=True)
    else:
        mask = reference.visible(q_sets, k_sets, strict=True)[:, None]
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    benchmark(fn)


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("who", ["ours", "reference_index_put", "torch_cat"])
def test_kv_cache_append(benchmark, n, who):
    """A decode step's write: B=64, H=16, D=64 into a 520-slot cache."""
    benchmark.group = f"kv_cache_append fp32 B64 H16 S520 D64 n{n}"
    k_cache, v_cache = torch.randn(64, 16, 520, 64), torch.randn(64, 16, 520, 64)
    k, v = torch.randn(64, 16, n, 64), torch.randn(64, 16, n, 64)
    slots = torch.arange(300, 300 + n).expand(64, n)
    if who == "ours":
        fn = lambda: sarkernels.kv_cache_append(k_cache, v_cache, k, v, slots)
    elif who == "reference_index_put":
        fn = lambda: reference.kv_cache_append(k_cache, v_cache, k, v, slots)
    else:  # RAR re-concatenates the whole cache every step
        past_k, past_v = k_cache[:, :, :300], v_cache[:, :, :300]
        fn = lambda: (torch.cat([past_k, k], 2), torch.cat([past_v, v], 2))
    benchmark(fn)


@pytest.mark.parametrize("mode", ["rope_vector", "table_merge"])
@pytest.mark.parametrize("who", ["ours", "reference"])
def test_interleave(benchmark, mode, who):
    """RandAR-L training batch shape: B=32, N=256 tokens, D=1024 (16 heads), class prefix."""
    benchmark.group = f"interleave fp32 B32 N256 D1024 {mode}"
    tokens, prefix = torch.randn(32, 256, 1024), torch.randn(32, 1, 1024)
    positions = torch.stack([torch.randperm(256) for _ in range(32)])
    instruction = torch.randn(1024) if mode == "rope_vector" else torch.randn(256, 1024)
    kw = dict(num_heads=16, grid_size=16, prefix=prefix, merge=mode == "table_merge")
    with sarkernels.use_backend("kernels" if who == "ours" else "reference"):
        benchmark(lambda: sarkernels.interleave_position_instructions(tokens, positions, instruction, **kw))
