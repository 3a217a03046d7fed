"""Every op on CUDA tensors with the kernels backend (the CUDA kernels of csrc/kernels/),
checked against the float64 reference on the CPU: dtypes, odd shapes, empty rows, GQA,
strides, bad values (nothing written), no sync with check=False and under CUDA graphs.
Skipped where no CUDA device is present (select with -m cuda); benchmarks/gpu_check.sh
runs them with benchmarks/simt_vs_gpu.py."""
import pytest
import torch
import torch.nn.functional as F

import sarkernels
from sarkernels import reference
from conftest import ERR_FLOOR, assert_within, attention_inputs, set_ids

pytestmark = pytest.mark.cuda
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def kernels():
    with sarkernels.use_backend("kernels"):
        yield


def sdpa_same_precision(q, k, v, q_sets, k_sets):
    group = q.shape[1] // k.shape[1]
    mask = reference.visible(q_sets, k_sets)[:, None]
    empty = ~mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                         v.repeat_interleave(group, 1), attn_mask=mask | empty)
    return out.masked_fill(empty, 0)


SHAPES = [  # b, hq, hkv, lq, lk, d: decode steps, GQA/MQA, odd head dims, long caches
    (2, 4, 2, 1, 1, 8), (3, 8, 1, 4, 517, 64), (2, 4, 2, 33, 300, 40), (1, 2, 2, 257, 257, 128),
    (2, 16, 16, 2, 1000, 256), (1, 3, 3, 5, 70, 136), (2, 2, 1, 0, 5, 32), (2, 2, 1, 5, 0, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "blhd"])
def test_set_attention(dtype, shape, layout):
    b, hq, hkv, lq, lk, d = shape
    gen = torch.Generator().manual_seed(lq * 1000 + lk)
    q, k, v = attention_inputs(b, hq, hkv, lq, lk, d, gen, layout=layout)
    q_sets, k_sets = set_ids("random", b, lq, gen), set_ids("random", b, lk, gen)
    q_sets[:, ::3] = -1  # empty rows
    exact, exact_lse = reference.set_attention(q, k, v, q_sets, k_sets)
    dev = [t.to("cuda", dtype) for t in (q, k, v)]
    out, lse = sarkernels.set_attention(*dev, q_sets.cuda(), k_sets.cuda(), return_lse=True)
    assert out.dtype == dtype and out.device.type == "cuda"
    if dtype == torch.float64:
        torch.testing.assert_close(out.cpu(), exact, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse.cpu(), exact_lse, atol=1e-10, rtol=1e-10)
        return
    if lk:
        baseline = sdpa_same_precision(*dev, q_sets.cuda(), k_sets.cuda()).cpu()
    else:  # no keys at all: every row is empty, zeros
        baseline = torch.zeros_like(out.cpu())
    assert_within(out.cpu(), baseline, exact, dtype, "out")
    # lse is float32: against the float64 lse of the inputs as rounded to dtype
    rounded_lse = reference.set_attention(*(t.to(dtype).double() for t in (q, k, v)), q_sets,
                                          k_sets)[1]
    torch.testing.assert_close(lse.cpu().double(), rounded_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [3, 97])  # the decode kernel's forward, then the training one's
@pytest.mark.parametrize("deterministic", [False, True])
def test_set_attention_gradients(dtype, lq, deterministic):
    """The fused backward kernel (dQ by atomics, or a separate pass when deterministic)."""
    gen = torch.Generator().manual_seed(lq)
    q, k, v = attention_inputs(2, 4, 2, lq, 97, 64, gen, layout="blhd")
    q_sets, k_sets = set_ids("sorted", 2, lq, gen), set_ids("sorted", 2, 97, gen)
    g = torch.randn(q.shape, generator=gen, dtype=torch.float64)

    def grads(fn, dtype, device):
        leaves = [t.detach().to(device, dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, q_sets.to(device), k_sets.to(device))
        return [x.cpu() for x in torch.autograd.grad((out * g.to(device, dtype)).sum(), leaves)]

    exact = grads(lambda *a: reference.set_attention(*a)[0], torch.float64, "cpu")
    torch.use_deterministic_algorithms(deterministic)
    try:
        ours = grads(sarkernels.set_attention, dtype, "cuda")
    finally:
        torch.use_deterministic_algorithms(False)
    if dtype == torch.float64:
        for a, e in zip(ours, exact):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
        return
    base = grads(sdpa_same_precision, dtype, "cuda")
    for name, o, b, e in zip("qkv", ours, base, exact):
        assert_within(o, b, e, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 8, 24, 64, 136])
def test_kv_cache_append(dtype, d):
    gen = torch.Generator().manual_seed(d)
    cache = torch.full((3, 4, 40, d), float("nan"), dtype=dtype)
    k = torch.randn(3, 5, 4, d, generator=gen).to(dtype).transpose(1, 2)  # [B, n, H, D] layout
    slots = torch.stack([torch.randperm(40, generator=gen)[:5] for _ in range(3)])
    want = cache.clone()
    for b in range(3):
        want[b][:, slots[b]] = k[b]
    k_cache, v_cache = cache.cuda(), cache.clone().cuda()
    sarkernels.kv_cache_append(k_cache, v_cache, k.cuda(), k.cuda(), slots.cuda())
    for got in (k_cache, v_cache):
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("slots,match", [([[0, 6], [1, 2]], r"slots\[0, 1\] = 6 is outside"),
                                         ([[0, 1], [-1, 2]], r"slots\[1, 0\] = -1 is outside"),
                                         ([[3, 3], [1, 2]], "slot 3 appears more than once")])
def test_bad_slots_write_nothing(slots, match):
    k_cache = torch.zeros(2, 2, 6, 8, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    k = torch.ones(2, 2, 2, 8, device="cuda")
    slots = torch.tensor(slots, device="cuda")
    with pytest.raises(ValueError, match=match):
        sarkernels.kv_cache_append(k_cache, v_cache, k, k, slots)
    sarkernels.kv_cache_append(k_cache, v_cache, k, k, slots, check=False)  # no sync, no error
    torch.cuda.synchronize()
    assert not k_cache.any() and not v_cache.any()


def test_kv_cache_append_in_a_cuda_graph():
    """check=True never syncs while capturing: the write is capturable; bad slots replayed
    write nothing."""
    k_cache = torch.zeros(1, 2, 8, 16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(1, 2, 2, 16, device="cuda")
    slots = torch.tensor([[1, 5]], device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm-up outside capture
        sarkernels.kv_cache_append(k_cache, v_cache, k, -k, slots)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sarkernels.kv_cache_append(k_cache, v_cache, k, -k, slots)
    k_cache.zero_()
    v_cache.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(k_cache[0, :, 5], k[0, :, 1]) and torch.equal(v_cache[0, :, 1], -k[0, :, 0])
    k_cache.zero_()
    slots.copy_(torch.tensor([[1, 9]]))
    graph.replay()
    torch.cuda.synchronize()
    assert not k_cache.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_interleave(dtype, table, merge, deterministic):
    gen = torch.Generator().manual_seed(3)
    b, n, d, grid = 3, 37, 96, (7, 9)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    tokens, prefix = rnd(b, n, d), rnd(b, 2, d)
    positions = torch.stack([torch.randperm(63, generator=gen)[:n] for _ in range(b)])
    instruction = rnd(63, d) if table else rnd(d)
    kw = dict(num_heads=3, grid_size=grid, merge=merge)
    leaves = [t.requires_grad_() for t in (tokens, instruction, prefix)]
    exact = reference.interleave_position_instructions(tokens, positions, instruction, 3, grid,
                                                       10000.0, prefix, merge)
    g = rnd(*exact.shape).to(dtype)
    # gradients are sums of g's rows: exact for g as rounded to dtype
    exact_grads = torch.autograd.grad((exact * g.double()).sum(), leaves)
    dev = [t.detach().to("cuda", dtype).requires_grad_() for t in leaves]
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = sarkernels.interleave_position_instructions(dev[0], positions.cuda(), dev[1],
                                                          prefix=dev[2], **kw)
        grads = torch.autograd.grad((out * g.cuda()).sum(), dev)
    finally:
        torch.use_deterministic_algorithms(False)
    assert_within(out.cpu(), exact.to(dtype), exact, dtype, "out")
    for name, a, e in zip(("tokens", "instruction", "prefix"), grads, exact_grads):
        torch.testing.assert_close(a.cpu().double(), e, atol=ERR_FLOOR[dtype],
                                   rtol=ERR_FLOOR[dtype], msg=name)


def test_interleave_bad_positions():
    tokens, table = torch.randn(2, 2, 8, device="cuda"), torch.randn(12, 8, device="cuda")
    positions = torch.tensor([[0, 1], [5, 12]], device="cuda")
    with pytest.raises(ValueError, match=r"positions\[1, 1\] = 12 is outside \[0, 12\)"):
        sarkernels.interleave_position_instructions(tokens, positions, table)
    sarkernels.interleave_position_instructions(tokens, positions, table, check=False)
    torch.cuda.synchronize()  # no error, no out-of-bounds read


def test_info_says_cuda_runs_kernels():
    cuda = sarkernels.info()["backends"]["cuda"]
    assert cuda["usable"], cuda["why_not"]
    assert cuda["ops"]["set_attention"] == "kernel" and cuda["ops"]["kv_cache_append"] == "kernel"
