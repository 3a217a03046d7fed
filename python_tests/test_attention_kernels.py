"""The fused set-attention kernels (csrc/kernels/attention_fwd.cuh, attention_bwd.cuh) run
by the SIMT executor: forward and backward (through lse too) against the float64
reference over hypothesis-drawn shapes and set patterns (more than 16 queries: fewer take
the decode kernel forward). bf16/fp16 errors of out, lse and every gradient stay within
2x PyTorch's own same-precision computation; float32/float64 agree tightly; every run
repeats under a second schedule with identical bits (outputs are NaN-poisoned by the simt
glue); the deterministic backward keeps its bits on several OS threads."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import sarkernels
from sarkernels import reference
from conftest import HAS_SIMT, assert_within, bits, set_ids, simt_options

pytestmark = pytest.mark.skipif(not HAS_SIMT, reason="sarkernels._simt not built (SARKERNELS_SIMT=1)")

LOW = [torch.bfloat16, torch.float16]
PATTERNS = ["sorted", "unsorted", "arange", "equal", "empty_rows", "cross"]


@contextlib.contextmanager
def deterministic(on):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@st.composite
def cases(draw):
    hkv = draw(st.integers(1, 2))
    c = dict(b=draw(st.integers(1, 2)), hkv=hkv, hq=hkv * draw(st.sampled_from([1, 2])),
             lq=draw(st.integers(17, 80)), lk=draw(st.integers(1, 80)),
             d=draw(st.sampled_from([64, 128])), pattern=draw(st.sampled_from(PATTERNS)),
             strict=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))
    if c["pattern"] == "cross":  # SAR: queries of set s see the encoder's sets < s
        c.update(strict=True, lk=c["lq"] + 1)
    elif draw(st.booleans()):
        c["lk"] = c["lq"]
    return c


def build(c):
    """float64 q, k, v, the set ids, and upstream gradients for out and lse."""
    gen = torch.Generator().manual_seed(c["seed"])
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    q, k, v = rand(c["b"], c["hq"], c["lq"], c["d"]), rand(c["b"], c["hkv"], c["lk"], c["d"]), \
        rand(c["b"], c["hkv"], c["lk"], c["d"])
    sets = lambda pattern, length: set_ids(pattern, c["b"], length, gen, max(1, length // 16))
    if c["pattern"] == "cross":
        q_sets = sets("sorted", c["lq"]) + 1
        k_sets = torch.cat([torch.zeros(c["b"], 1, dtype=torch.long), sets("sorted", c["lk"] - 1) + 1], 1)
    else:
        pattern = {"unsorted": "random", "empty_rows": "random"}.get(c["pattern"], c["pattern"])
        q_sets, k_sets = sets(pattern, c["lq"]), sets(pattern, c["lk"])
        if c["pattern"] == "empty_rows":
            q_sets[:, ::3] = -1
    grads = rand(c["b"], c["hq"], c["lq"], c["d"]), rand(c["b"], c["hq"], c["lq"])
    return (q, k, v), q_sets, k_sets, grads


def finite(lse):
    return torch.where(torch.isinf(lse), 0, lse)


def outputs_and_grads(fn, inputs, dtype, grads):
    """out, lse, dq, dk, dv of fn(q, k, v) -> (out, lse) in dtype, for the loss
    sum(out * g_out) + sum(lse * g_lse) (lse's -inf rows left out)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out, lse = fn(*leaves)
    g_out, g_lse = grads
    loss = (out * g_out.to(out.dtype)).sum() + (finite(lse) * g_lse.to(lse.dtype)).sum()
    return [out.detach(), lse.detach(), *torch.autograd.grad(loss, leaves)]


def ours(c, q_sets, k_sets):
    return lambda q, k, v: sarkernels.set_attention(q, k, v, q_sets, k_sets, strict=c["strict"],
                                                    return_lse=True)


def exact(c, q_sets, k_sets):
    return lambda q, k, v: reference.set_attention(q, k, v, q_sets, k_sets, c["strict"])


def pytorch_same_precision(c, q_sets, k_sets):
    """SDPA with the dense mask, and lse as a logsumexp of the same-precision scores; rows
    with no visible key: zeros and -inf."""
    def fn(q, k, v):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        mask = reference.visible(q_sets, k_sets, c["strict"])[:, None]
        empty = ~mask.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty).masked_fill(empty, 0)
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        lse = s.masked_fill(~(mask | empty), float("-inf")).logsumexp(-1)
        return out, lse.float().masked_fill(empty.squeeze(-1), float("-inf"))
    return fn


def under_two_schedules(fn):
    """fn() under the forward schedule and a random one; the results' bits must agree."""
    with simt_options("forward"):
        first = fn()
    with simt_options("random", seed=1):
        second = fn()
    for a, b in zip(first, second):
        assert torch.equal(bits(a), bits(b)), "results depend on the thread schedule"
    return first


NAMES = ["out", "lse", "dq", "dk", "dv"]


def case(**kw):
    c = dict(b=1, hkv=1, hq=1, lq=17, lk=17, d=64, pattern="sorted", strict=False, seed=0)
    return c | kw


@given(c=cases())
@example(c=case(lq=64, lk=65, hq=4, pattern="unsorted"))  # tile edge, GQA 4:1
@example(c=case(lk=1, pattern="equal"))  # one key
@example(c=case(b=2, lq=80, lk=81, d=128, hkv=2, hq=4, pattern="cross", strict=True))
@settings(max_examples=30)
def test_low_precision_within_pytorch(c):
    inputs, q_sets, k_sets, grads = build(c)
    want = outputs_and_grads(exact(c, q_sets, k_sets), inputs, torch.float64, grads)
    with sarkernels.use_backend("simt"):
        for dtype in LOW:
            got = under_two_schedules(
                lambda: outputs_and_grads(ours(c, q_sets, k_sets), inputs, dtype, grads))
            base = outputs_and_grads(pytorch_same_precision(c, q_sets, k_sets), inputs, dtype, grads)
            assert got[0].dtype == dtype and got[1].dtype == torch.float32
            assert torch.equal(got[1].isneginf(), want[1].isneginf()), "empty rows differ"
            for name, g, b, w in zip(NAMES, got, base, want):
                if name == "lse":  # -inf on empty rows, checked above
                    g, b, w = finite(g), finite(b), finite(w)
                assert_within(g, b, w, dtype, name)


@given(c=cases())
@settings(max_examples=12)
def test_float_paths_are_tight(c):
    inputs, q_sets, k_sets, grads = build(c)
    want = outputs_and_grads(exact(c, q_sets, k_sets), inputs, torch.float64, grads)
    with sarkernels.use_backend("simt"):
        got64 = under_two_schedules(
            lambda: outputs_and_grads(ours(c, q_sets, k_sets), inputs, torch.float64, grads))
        got32 = outputs_and_grads(ours(c, q_sets, k_sets), inputs, torch.float32, grads)
    base32 = outputs_and_grads(pytorch_same_precision(c, q_sets, k_sets), inputs, torch.float32, grads)
    for name, g64, g32, b32, w in zip(NAMES, got64, got32, base32, want):
        torch.testing.assert_close(g64, w, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")
        if name == "lse":
            g32, b32, w = finite(g32), finite(b32), finite(w)
        assert_within(g32, b32, w, torch.float32, name)


@pytest.mark.asan  # the fused fwd/bwd kernels once under AddressSanitizer
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deterministic_backward_keeps_its_bits_on_threads(dtype):
    c = dict(b=2, hq=4, hkv=2, lq=70, lk=70, d=64, pattern="sorted", strict=False, seed=5)
    inputs, q_sets, k_sets, grads = build(c)
    runs = []
    with sarkernels.use_backend("simt"), deterministic(True):
        for schedule, seed in (("forward", 0), ("random", 3)):
            with simt_options(schedule, seed, threads=2):
                runs.append(outputs_and_grads(ours(c, q_sets, k_sets), inputs, dtype, grads))
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(bits(a), bits(b)), f"{name} changed between runs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_atomic_backward_on_threads(dtype):
    """dQ is turned into dq by the last of each head's dK/dV blocks to finish (4 here, GQA
    groups of 2), which must see every block's sums, blocks running on two OS threads."""
    c = dict(b=2, hq=4, hkv=2, lq=70, lk=200, d=64, pattern="sorted", strict=False, seed=6)
    inputs, q_sets, k_sets, grads = build(c)
    want = outputs_and_grads(exact(c, q_sets, k_sets), inputs, torch.float64, grads)
    base = outputs_and_grads(pytorch_same_precision(c, q_sets, k_sets), inputs, dtype, grads)
    with sarkernels.use_backend("simt"), deterministic(False):
        for schedule, seed in (("forward", 0), ("random", 3)):
            with simt_options(schedule, seed, threads=2):
                got = outputs_and_grads(ours(c, q_sets, k_sets), inputs, dtype, grads)
            for name, g, b, w in zip(NAMES, got, base, want):
                assert_within(g, b, w, dtype, name)


@pytest.mark.parametrize("d", [32, 40, 96, 120, 128, 136, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_other_head_dims(d, dtype):
    """The 32, 96, 128 and 256 kernels and head dims zero-padded into the next one, both dQ
    modes (whose dK/dV tiles differ at 128), under two schedules with identical bits (float64
    above its limit: the decode forward and the reference backward)."""
    c = case(lq=40, lk=33, d=d, hq=2, pattern="unsorted", seed=d)
    inputs, q_sets, k_sets, grads = build(c)
    want = outputs_and_grads(exact(c, q_sets, k_sets), inputs, torch.float64, grads)
    with sarkernels.use_backend("simt"):
        runs = []
        for det in (False, True):
            with deterministic(det):
                runs.append(under_two_schedules(
                    lambda: outputs_and_grads(ours(c, q_sets, k_sets), inputs, dtype, grads)))
    base = None if dtype == torch.float64 else \
        outputs_and_grads(pytorch_same_precision(c, q_sets, k_sets), inputs, dtype, grads)
    for got in runs:
        for i, (name, g, w) in enumerate(zip(NAMES, got, want)):
            if base is None:
                torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10,
                                           msg=lambda m: f"{name}: {m}")
            else:
                assert_within(finite(g), finite(base[i]), finite(w), dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_backward_kernel_refuses_head_dims_past_the_built_limit(dtype):
    """The limit the extension reports (the one sarkernels.ops and info() use) is the one the
    glue enforces; the autograd backward takes the reference recompute past it (above)."""
    limit = sarkernels.ops._simt.attention_max_head_dim[str(dtype).removeprefix("torch.")]
    assert limit >= 128 and str(limit) in sarkernels.ops.ATTENTION_RULE
    backward = torch.ops.sarkernels_simt.set_attention_backward
    sets = torch.zeros(1, 17, dtype=torch.long)
    for d in (limit, limit + 8):
        q = torch.randn(1, 1, 17, d, dtype=dtype)
        lse = torch.zeros(1, 1, 17, dtype=reference.work_dtype(dtype))
        if d == limit:
            dq, dk, dv = backward(q, None, q, q, q, q, lse, sets, sets, False, 1.0)
            assert dq.shape == q.shape
        else:
            with pytest.raises(RuntimeError, match=f"multiples of 8 up to {limit} for"):
                backward(q, None, q, q, q, q, lse, sets, sets, False, 1.0)


@pytest.mark.asan
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("det", [False, True])
def test_kernels_under_the_sanitizer(dtype, det):
    """Small enough for `make simt-asan`; a NaN value exercises the value scrub."""
    c = case(b=2, lq=37, lk=70, hq=2, pattern="unsorted", seed=11)
    inputs, q_sets, k_sets, grads = build(c)
    want = outputs_and_grads(exact(c, q_sets, k_sets), inputs, torch.float64, grads)
    with sarkernels.use_backend("simt"), deterministic(det):
        got = under_two_schedules(
            lambda: outputs_and_grads(ours(c, q_sets, k_sets), inputs, dtype, grads))
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=0.1, rtol=0.1)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m: f"{name}: {m}")
    q, k, v = inputs
    v = v.clone()
    v[1, 0, 5, 3] = float("nan")
    with sarkernels.use_backend("simt"):
        out, lse = ours(c, q_sets, k_sets)(q.to(dtype), k.to(dtype), v.to(dtype))
    r_out, r_lse = reference.set_attention(q, k, v, q_sets, k_sets, c["strict"])
    torch.testing.assert_close(out.double(), r_out, **tol, equal_nan=True)
    torch.testing.assert_close(lse.double(), r_lse, **tol, equal_nan=True)
