"""The ops on the simt backend (the CUDA kernels of csrc/kernels/ run by the SIMT executor):
identical bits under every schedule, every head dim the decode kernel takes, the same bits
as the CPU kernels where both add in the same order, and bad values raised with nothing
written whatever `check` says. The op tests of test_set_attention, test_kv_cache_append and
test_interleave run on simt too (their `backend` fixture)."""
import pytest
import torch

import sarkernels
from sarkernels import reference
from conftest import HAS_KERNELS, HAS_SIMT, attention_inputs, bits, set_ids, simt_options

pytestmark = pytest.mark.skipif(not HAS_SIMT, reason="sarkernels._simt not built (SARKERNELS_SIMT=1)")

# (schedule, seed, OS threads running blocks)
SCHEDULES = [("forward", 0, 1), ("reverse", 0, 1), ("random", 3, 1), ("random", 4, 2)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def same_bits_under_every_schedule(run, schedules=SCHEDULES):
    """Runs `run` (returning tensors) on the simt backend under each schedule; every run
    must give the first one's bits."""
    results = []
    for schedule, seed, threads in schedules:
        with simt_options(schedule, seed, threads), sarkernels.use_backend("simt"):
            results.append([t.detach().clone() for t in run()])
    for schedule, got in zip(schedules[1:], results[1:]):
        for a, b in zip(results[0], got):
            assert torch.equal(bits(a), bits(b)), f"different bits under {schedule}"
    return results[0]


@pytest.mark.asan  # the emulated kernels once under AddressSanitizer (make simt-asan)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_same_bits_under_every_schedule(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = attention_inputs(2, 4, 2, 5, 150, 40, gen, dtype)  # GQA, 3 key splits, D % 32 != 0
    q_sets, k_sets = set_ids("random", 2, 5, gen), set_ids("random", 2, 150, gen)
    q_sets[:, 0] = -1  # an empty row
    out, lse = same_bits_under_every_schedule(
        lambda: sarkernels.set_attention(q, k, v, q_sets, k_sets, return_lse=True))
    exact = reference.set_attention(q.double(), k.double(), v.double(), q_sets, k_sets)
    torch.testing.assert_close(out.double(), exact[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), exact[1], atol=2e-2, rtol=2e-2)


@pytest.mark.asan  # the emulated kernels once under AddressSanitizer (make simt-asan)
@pytest.mark.parametrize("d", [1, 8, 16, 24])
def test_kv_cache_append_same_bits_under_every_schedule(d):
    # d = 8 float32 rows are 32 bytes: the 16-byte copy kernel; the others copy bytes
    gen = torch.Generator().manual_seed(d)
    k_cache = torch.full((2, 3, 9, d), float("nan"))
    new = torch.randn(2, 3, 4, d, generator=gen)
    slots = torch.stack([torch.randperm(9, generator=gen)[:4] for _ in range(2)])

    def run():
        cache = k_cache.clone()
        sarkernels.kv_cache_append(cache, cache.clone(), new, new, slots)
        return [cache]

    cache, = same_bits_under_every_schedule(run)
    for b in range(2):
        assert torch.equal(cache[b][:, slots[b]], new[b])


def interleave_case(dtype, table, merge, gen):
    tokens = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    positions = torch.stack([torch.randperm(12, generator=gen)[:5] for _ in range(2)])
    shape = (12, 16) if table else (16,)
    instruction = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    prefix = torch.randn(2, 2, 16, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    grad = torch.randn(2, 2 + (5 if merge else 10), 16, generator=gen, dtype=torch.float64).to(dtype)

    def run():
        out = sarkernels.interleave_position_instructions(
            tokens, positions, instruction, num_heads=2, grid_size=(3, 4), prefix=prefix,
            merge=merge)
        return [out, *torch.autograd.grad(out, (tokens, instruction, prefix), grad)]

    return run


@pytest.mark.asan  # the emulated kernels once under AddressSanitizer (make simt-asan)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table,merge", [(True, False), (False, True)])
def test_interleave_same_bits_under_every_schedule(dtype, table, merge):
    run = interleave_case(dtype, table, merge, torch.Generator().manual_seed(1))
    torch.use_deterministic_algorithms(True)
    try:  # column-ownership instruction gradient: any thread count
        same_bits_under_every_schedule(run)
    finally:
        torch.use_deterministic_algorithms(False)
    # atomics: blocks run in a fixed order on one OS thread, so the bits are fixed there
    same_bits_under_every_schedule(run, [s for s in SCHEDULES if s[2] == 1])


@pytest.mark.skipif(not HAS_KERNELS, reason="sarkernels._C not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table,merge", [(True, False), (False, True), (True, True)])
def test_interleave_same_bits_as_the_cpu_kernels(dtype, table, merge):
    """The deterministic CUDA kernels add in the CPU kernels' order: the same bits."""
    run = interleave_case(dtype, table, merge, torch.Generator().manual_seed(2))
    torch.use_deterministic_algorithms(True)
    try:
        with sarkernels.use_backend("simt"):
            ours = run()
        with sarkernels.use_backend("kernels"):
            cpu = run()
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(("out", "d_tokens", "d_instruction", "d_prefix"), ours, cpu):
        assert torch.equal(bits(a), bits(b)), name


@pytest.mark.parametrize("d", range(8, 257, 8))
def test_decode_attention_every_head_dim(d):
    gen = torch.Generator().manual_seed(d)
    q, k, v = attention_inputs(1, 2, 1, 3, 150, d, gen, layout="blhd")
    q_sets, k_sets = set_ids("random", 1, 3, gen), set_ids("random", 1, 150, gen)
    with sarkernels.use_backend("simt"):
        out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, return_lse=True)
    r_out, r_lse = reference.set_attention(q, k, v, q_sets, k_sets)
    torch.testing.assert_close(out, r_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, r_lse, atol=1e-12, rtol=1e-12)


def test_decode_attention_refuses_head_dims_above_256():
    q = torch.randn(1, 1, 2, 264)
    sets = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        torch.ops.sarkernels_simt.set_attention(q, q, q, sets, sets, False, 1.0)


@pytest.mark.asan  # the emulated kernels once under AddressSanitizer (make simt-asan)
@pytest.mark.parametrize("check", [True, False])
def test_bad_slots_raise_and_write_nothing_whatever_check(check):
    """check=False only skips a device sync on CUDA; the simt flag read is free."""
    k_cache = torch.full((2, 2, 6, 8), float("nan"))
    k = torch.ones(2, 2, 2, 8)
    for slots, match in (([[0, 1], [2, 6]], r"slots\[1, 1\] = 6 is outside"),
                         ([[0, 0], [9, 1]], r"slots\[1, 0\] = 9 is outside"),
                         ([[0, 1], [3, 3]], r"slot 3 appears more than once in slots\[1\]")):
        cache = k_cache.clone()
        with sarkernels.use_backend("simt"), pytest.raises(ValueError, match=match):
            sarkernels.kv_cache_append(cache, cache.clone(), k, k, torch.tensor(slots),
                                       check=check)
        assert torch.equal(bits(cache), bits(k_cache))


@pytest.mark.parametrize("check", [True, False])
def test_bad_positions_raise_whatever_check(check):
    tokens, positions = torch.randn(2, 2, 8), torch.tensor([[0, 1], [5, 12]])
    with sarkernels.use_backend("simt"), pytest.raises(ValueError, match=r"positions\[1, 1\] = 12"):
        sarkernels.interleave_position_instructions(tokens, positions, torch.randn(12, 8),
                                                    check=check)


@pytest.mark.parametrize("ns", ["sarkernels", "sarkernels_simt"])
def test_interleave_backward_op_checks_positions(ns):
    if ns == "sarkernels" and not HAS_KERNELS:
        pytest.skip("sarkernels._C not built")
    op = getattr(torch.ops, ns).interleave_position_instructions_backward
    with pytest.raises(ValueError, match=r"positions\[0, 1\] = -3 is outside \[0, 4\)"):
        op(torch.randn(1, 4, 8), torch.tensor([[0, -3]]), torch.randn(4, 8), 0, 0, 0, 0, 1e4,
           False)


def test_set_attention_backward_kernel_after_the_decode_forward():
    """The fused backward kernel (info says so) also serves the few-query shapes whose
    forward ran the decode kernel; more in test_attention_kernels.py."""
    assert sarkernels.info()["backends"]["simt"]["ops"]["set_attention_backward"] == "kernel"
    gen = torch.Generator().manual_seed(3)
    q, k, v = (t.requires_grad_() for t in attention_inputs(1, 2, 1, 7, 9, 16, gen))
    q_sets, k_sets = set_ids("random", 1, 7, gen), set_ids("random", 1, 9, gen)
    g = torch.randn(1, 2, 7, 16, generator=gen, dtype=torch.float64)
    with sarkernels.use_backend("simt"):
        ours = torch.autograd.grad((sarkernels.set_attention(q, k, v, q_sets, k_sets) * g).sum(),
                                   (q, k, v))
    want = torch.autograd.grad((reference.set_attention(q, k, v, q_sets, k_sets)[0] * g).sum(),
                               (q, k, v))
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,hq,hkv,lq,lk,strict", [
    (64, 4, 1, 1, 700, False),    # GQA 4, one query, several splits and a ragged tile
    (64, 2, 2, 16, 333, True),    # 16 queries: one full 16-row block per head
    (128, 8, 2, 3, 150, False),   # 12 rows per block, 16-key warp tiles
    (40, 3, 1, 7, 90, True),      # head dim below the kernel's 64: zero-filled columns
    (256, 2, 1, 2, 70, False),    # Q from shared memory
    (136, 1, 1, 5, 41, False),    # head dim 136 in the 256 kernel
])
def test_decode_mma_kernel_nonfinite_values_and_masks(dtype, d, hq, hkv, lq, lk, strict):
    """The tensor-core decode kernel (16-bit, aligned rows): unsorted ids (partial tiles),
    an empty row, NaN and inf values and keys that only some rows see, identical bits
    under every schedule, and the float64 reference on the same rounded inputs."""
    gen = torch.Generator().manual_seed(d + lq)
    q, k, v = attention_inputs(2, hq, hkv, lq, lk, d, gen, dtype)
    q_sets, k_sets = set_ids("random", 2, lq, gen), set_ids("random", 2, lk, gen)
    q_sets[0, 0] = -1  # an empty row
    k_sets[0, 5] = 4   # a NaN value seen only by rows of set 4 (strict: by none)
    v[0, :, 5, 3] = float("nan")
    k_sets[0, lk - 2] = 0  # an inf value seen by most rows
    v[0, :, lk - 2, 0] = float("inf")
    # batch 1: keys of set 0 (full tiles for rows above set 0, the last one ragged) but two
    # of set 3, one with an inf key, one with a NaN value, which the rows of set 4 see
    k_sets[1, :] = 0
    k_sets[1, 7] = k_sets[1, 9] = 3
    q_sets[1, 0] = 4
    k[1, :, 7, 1] = float("inf")
    v[1, :, 9, 2] = float("nan")
    out, lse = same_bits_under_every_schedule(
        lambda: sarkernels.set_attention(q, k, v, q_sets, k_sets, strict=strict, return_lse=True))
    want, want_lse = reference.set_attention(q.double(), k.double(), v.double(), q_sets, k_sets,
                                             strict=strict)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2, equal_nan=True)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-2, rtol=2e-2, equal_nan=True)
    assert torch.isnan(want).any() and not torch.isnan(want).all()  # the case is exercised


@pytest.mark.parametrize("strict", [False, True])
def test_decode_mma_kernel_extreme_set_ids(strict):
    """Set ids at the ends of int64 (the kernel tests k <= q - strict, with a strict
    INT64_MIN query seeing nothing)."""
    lo, hi = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    gen = torch.Generator().manual_seed(5)
    q, k, v = attention_inputs(1, 2, 1, 4, 70, 64, gen, torch.bfloat16)
    q_sets = torch.tensor([[lo, hi, 0, lo]])
    k_sets = torch.tensor([[lo, hi, 0, -5, 7] * 14])
    with sarkernels.use_backend("simt"):
        out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, strict=strict, return_lse=True)
    want, want_lse = reference.set_attention(q.double(), k.double(), v.double(), q_sets, k_sets,
                                             strict=strict)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-2, rtol=2e-2)
