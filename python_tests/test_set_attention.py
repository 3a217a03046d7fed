import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sarkernels
from sarkernels import reference
from conftest import DTYPES, NAMESPACES, assert_within, attention_inputs, max_err, set_ids

PATTERNS = ["random", "sorted", "equal", "arange", "empty_rows"]


@st.composite
def cases(draw):
    hkv = draw(st.integers(1, 3))
    case = dict(b=draw(st.integers(1, 3)), hkv=hkv, hq=hkv * draw(st.integers(1, 3)),
                lq=draw(st.integers(1, 150)), lk=draw(st.integers(1, 150)),
                d=draw(st.sampled_from([8, 16, 32, 64])),
                pattern=draw(st.sampled_from(PATTERNS)), strict=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "blhd"])),
                seed=draw(st.integers(0, 2**31)))
    if draw(st.booleans()):
        case["lk"] = case["lq"]  # self-attention shapes, where sorted ids make staircases
    return case


def build(c, dtype=torch.float64):
    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = attention_inputs(c["b"], c["hq"], c["hkv"], c["lq"], c["lk"], c["d"], gen, dtype,
                               c["layout"])
    pattern = "random" if c["pattern"] == "empty_rows" else c["pattern"]
    q_sets = set_ids(pattern, c["b"], c["lq"], gen)
    k_sets = set_ids(pattern, c["b"], c["lk"], gen)
    if c["pattern"] == "empty_rows":  # some queries precede every key
        q_sets[:, ::3] = -1
    return q, k, v, q_sets, k_sets


def sdpa_same_precision(q, k, v, q_sets, k_sets, strict):
    """PyTorch's own computation in q's dtype; rows with no visible key set to zero."""
    group = q.shape[1] // k.shape[1]
    mask = reference.visible(q_sets, k_sets, strict)[:, None]
    empty = ~mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                         v.repeat_interleave(group, 1), attn_mask=mask | empty)
    return out.masked_fill(empty, 0)


@given(cases())
def test_matches_float64_reference(backend, c):
    q, k, v, q_sets, k_sets = build(c)
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, strict=c["strict"],
                                        return_lse=True)
    r_out, r_lse = reference.set_attention(q, k, v, q_sets, k_sets, c["strict"])
    torch.testing.assert_close(out, r_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, r_lse, atol=1e-10, rtol=1e-10)  # -inf where empty
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    finite = lambda x: torch.where(torch.isinf(x), 0, x)
    grads = torch.autograd.grad((out * g_out).sum() + (finite(lse) * g_lse).sum(), (q, k, v))
    r_grads = torch.autograd.grad((r_out * g_out).sum() + (finite(r_lse) * g_lse).sum(), (q, k, v))
    for name, a, r in zip("qkv", grads, r_grads):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(c=cases())
def test_low_precision_error_within_pytorch(backend, dtype, c):
    q64, k64, v64, q_sets, k_sets = build(c)
    exact = reference.set_attention(q64, k64, v64, q_sets, k_sets, c["strict"])[0]
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    out = sarkernels.set_attention(q, k, v, q_sets, k_sets, strict=c["strict"])
    assert out.dtype == dtype and out.shape == q.shape
    baseline = sdpa_same_precision(q, k, v, q_sets, k_sets, c["strict"])
    assert_within(out, baseline, exact, dtype, "out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_gradients_within_pytorch(backend, dtype):
    c = dict(b=2, hq=4, hkv=2, lq=97, lk=97, d=64, pattern="sorted", strict=False,
             layout="blhd", seed=3)
    q64, k64, v64, q_sets, k_sets = build(c)
    g = torch.randn(q64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64)]
        out = fn(*leaves, q_sets, k_sets)
        return torch.autograd.grad((out * g.to(dtype)).sum(), leaves)

    exact = grads(lambda *a: reference.set_attention(*a)[0], torch.float64)
    ours = grads(sarkernels.set_attention, dtype)
    base = grads(lambda q, k, v, qs, ks: sdpa_same_precision(q, k, v, qs, ks, False), dtype)
    for name, o, b, e in zip("qkv", ours, base, exact):
        assert_within(o, b, e, dtype, f"d{name}")


def test_empty_rows_are_zero_with_zero_gradients(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = attention_inputs(2, 2, 2, 9, 7, 16, gen, torch.float32)
    q_sets = torch.tensor([[0, 1, -5, 2, -5, 3, 3, -1, 9]] * 2)
    k_sets = torch.tensor([[0, 0, 1, 2, 3, 5, 9]] * 2)
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, return_lse=True)
    empty = q_sets[0] < 0
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all() and torch.isfinite(lse[:, :, ~empty]).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))
    # no visible key anywhere: all zeros, never NaN
    none = sarkernels.set_attention(q, k, v, k_sets.new_full(q_sets.shape, -1), k_sets)
    assert torch.equal(none, torch.zeros_like(none))


def test_nan_propagates_and_only_no_visible_key_is_empty(backend):
    """A row is empty iff no key is visible (zeros, lse -inf); a NaN score is not
    "nothing visible": it reaches out and lse."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = attention_inputs(1, 2, 1, 4, 70, 16, gen)
    q[0, 1, 2, 5] = float("nan")
    q_sets = torch.tensor([[1, -1, 2, 3]])
    k_sets = set_ids("random", 1, 70, gen).clamp(0, 1)
    out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, return_lse=True)
    assert out[0, 1, 2].isnan().all() and lse[0, 1, 2].isnan()
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.isneginf(lse[:, :, 1]).all()
    finite = torch.ones_like(lse, dtype=torch.bool)
    finite[0, 1, 2] = finite[:, :, 1] = False
    assert torch.isfinite(lse[finite]).all() and torch.isfinite(out[finite]).all()


@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 300), (300, 1), (0, 5), (5, 0)])
def test_degenerate_lengths(backend, lq, lk):
    gen = torch.Generator().manual_seed(1)
    q, k, v = attention_inputs(2, 2, 1, lq, lk, 32, gen)
    q_sets, k_sets = set_ids("random", 2, lq, gen), set_ids("random", 2, lk, gen)
    out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, return_lse=True)
    r_out, r_lse = reference.set_attention(q, k, v, q_sets, k_sets)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(lse, r_lse)


def test_special_cases_equal_sdpa(backend):
    gen = torch.Generator().manual_seed(2)
    q, k, v = attention_inputs(2, 4, 4, 130, 130, 64, gen)
    pos = torch.arange(130).expand(2, 130)
    causal = sarkernels.set_attention(q, k, v, pos, pos)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    same = torch.full((2, 130), 7)
    full = sarkernels.set_attention(q, k, v, same, same)
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q, k, v))
    # SAR cross-attention: queries of set s see encoder keys of sets < s
    q2, _, _ = attention_inputs(2, 4, 4, 40, 1, 64, gen)
    q_sets = torch.arange(40).expand(2, 40) // 10 + 1
    k_sets = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(129) // 43 + 1]).expand(2, 130)
    cross = sarkernels.set_attention(q2, k, v, q_sets, k_sets, strict=True)
    mask = (k_sets[:, None, :] < q_sets[:, :, None])[:, None]
    torch.testing.assert_close(cross, F.scaled_dot_product_attention(q2, k, v, attn_mask=mask))


def test_scale_and_int32_sets(backend):
    gen = torch.Generator().manual_seed(5)
    q, k, v = attention_inputs(1, 2, 2, 33, 33, 32, gen)
    s = set_ids("sorted", 1, 33, gen)
    a = sarkernels.set_attention(q, k, v, s.int(), s.short(), scale=0.3)
    torch.testing.assert_close(a, reference.set_attention(q, k, v, s, s, False, 0.3)[0])
    default = sarkernels.set_attention(q, k, v, s, s)
    torch.testing.assert_close(default, sarkernels.set_attention(q, k, v, s, s, scale=1 / math.sqrt(32)))


@pytest.mark.parametrize("ns", NAMESPACES)
def test_opcheck(ns):
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        q, k, v = attention_inputs(2, 4, 2, 37, 45, 32, gen, dtype, "blhd")
        q_sets, k_sets = set_ids("sorted", 2, 37, gen), set_ids("random", 2, 45, gen)
        for t in (q, k, v):
            t.requires_grad_(dtype != torch.bfloat16)
        torch.library.opcheck(getattr(torch.ops, ns).set_attention.default,
                              (q, k, v, q_sets, k_sets, False, 0.2))


def test_gradcheck(backend):
    gen = torch.Generator().manual_seed(7)
    q, k, v = attention_inputs(1, 2, 1, 11, 13, 8, gen)
    q_sets, k_sets = set_ids("random", 1, 11, gen), set_ids("random", 1, 13, gen)
    q_sets[0, 0] = -1  # one empty row
    for t in (q, k, v):
        t.requires_grad_()

    def f(q, k, v):
        out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, return_lse=True)
        return out, torch.where(torch.isinf(lse), 0, lse)

    # simt: the backward is the reference's (checked in full above); its forward runs per
    # probe of the numerical Jacobian, so probe random directions only
    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=backend == "simt")


def good_args():
    gen = torch.Generator().manual_seed(8)
    q, k, v = attention_inputs(2, 4, 2, 5, 6, 32, gen, torch.float32)
    return dict(q=q, k=k, v=v, q_sets=torch.zeros(2, 5, dtype=torch.long),
                k_sets=torch.zeros(2, 6, dtype=torch.long))


BAD = [  # (changes to good arguments, expected message)
    (lambda a: dict(q=a["q"][0]), "q must be 4-D"),
    (lambda a: dict(k=a["k"][:1], v=a["v"][:1]), r"k must be \[B=2"),
    (lambda a: dict(v=a["v"][:, :, :3]), "k and v must have one shape"),
    (lambda a: dict(k=torch.randn(2, 3, 6, 32), v=torch.randn(2, 3, 6, 32)),
     "multiple of k's 3 heads"),
    (lambda a: dict(q_sets=a["q_sets"].float()), "q_sets must be an integer"),
    (lambda a: dict(k_sets=a["k_sets"][:, :4]), r"k_sets must be \[B, Lk\]"),
    (lambda a: dict(q_sets=a["q_sets"][None]), "q_sets must be 2-D"),
    (lambda a: dict(v=a["v"].double()), "v must have dtype torch.float32"),
    (lambda a: dict(q=a["q"].int()), "q must be float32"),
    (lambda a: dict(q=torch.randn(2, 4, 5, 12), k=torch.randn(2, 2, 6, 12),
                    v=torch.randn(2, 2, 6, 12)), "head dim D must be"),
    (lambda a: dict(k_sets=a["k_sets"].to("meta")), "k_sets is on meta"),
    (lambda a: dict(scale="abc"), "scale must be a real number, got str 'abc'"),
    (lambda a: dict(scale="0.5"), "scale must be a real number, got str '0.5'"),
    (lambda a: dict(scale=[0.5]), r"scale must be a real number, got list \[0.5\]"),
    (lambda a: dict(scale=0.5j), r"scale must be a real number, got complex 0.5j"),
    (lambda a: dict(scale=True), "scale must be a real number, got bool True"),
    (lambda a: dict(strict="no"), r"strict must be a bool \(True or False\), got str 'no'"),
    (lambda a: dict(strict=1), "strict must be a bool .*got int 1"),
    (lambda a: dict(return_lse="yes"), "return_lse must be a bool .*got str 'yes'"),
]


@pytest.mark.parametrize("change,match", BAD)
def test_bad_input_names_the_argument(change, match):
    args = good_args()
    args.update(change(args))
    with pytest.raises((ValueError, TypeError), match=match):
        sarkernels.set_attention(**args)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_direct_op_call_checks_shapes(ns):
    args = good_args()
    with pytest.raises(RuntimeError, match="k_sets must be"):
        getattr(torch.ops, ns).set_attention(args["q"], args["k"], args["v"], args["q_sets"],
                                             args["k_sets"][:, :2], False, 1.0)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_direct_op_call_refuses_uint64_ids(ns):
    """Past the Python checks too: uint64 ids from 2^63 on would wrap to negative int64."""
    args = good_args()
    big = torch.full_like(args["q_sets"], 2**63, dtype=torch.uint64)
    with pytest.raises(TypeError, match="q_sets must be an integer tensor other than uint64"):
        getattr(torch.ops, ns).set_attention(args["q"], args["k"], args["v"], big,
                                             args["k_sets"], False, 1.0)


def test_unsorted_sets_are_not_assumed_sorted(backend):
    # Same visibility expressed with shuffled token order must give shuffled outputs.
    gen = torch.Generator().manual_seed(9)
    q, k, v = attention_inputs(1, 2, 2, 70, 70, 32, gen)
    sets = set_ids("sorted", 1, 70, gen, num_sets=9)
    perm = torch.randperm(70, generator=gen)
    a = sarkernels.set_attention(q, k, v, sets, sets)
    b = sarkernels.set_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], sets[:, perm], sets[:, perm])
    torch.testing.assert_close(b, a[:, :, perm])
    assert max_err(a, b) > 0  # the permutation really moved rows
