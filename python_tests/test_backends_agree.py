"""Every backend against a float64 oracle and so against each other, on drawn inputs: dtypes,
id and index dtypes, strides, empty rows and NaN/inf (issue 28's generic test).

Each example runs the op on every backend in one process. NaN/inf inputs are held to the
README's rule: a non-finite value reaches only the rows that see it, and the keys those
rows see; everything else must be finite and equal the oracle's. The shapes are small, so
an example takes milliseconds: 300 per test in CI, ``SARKERNELS_AGREE_EXAMPLES`` for more
(a nightly-size run: 5000).
"""
import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sarkernels
from conftest import BACKENDS, bits, non_finite_reach

examples = settings(max_examples=int(os.environ.get("SARKERNELS_AGREE_EXAMPLES", "300")))

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
# Agreement with the float64 oracle, relative to the oracle's magnitude: a few rounding
# steps of the dtype over the sums these small shapes take.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
POISON = [None, "nan_q", "inf_q", "inf_k", "nan_k", "nan_v", "inf_v"]


def assert_agrees(got, want, dtype, what):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype] * scale, rtol=TOL[dtype],
                               msg=lambda m: f"{what}: {m}")


def run_all(fn):
    """fn() on every backend: {backend: result}."""
    results = {}
    for name in BACKENDS:
        with sarkernels.use_backend(name):
            results[name] = fn()
    return results


# ---------------------------------------------------------------- set_attention

@st.composite
def attention_cases(draw):
    hkv = draw(st.integers(1, 2))
    return dict(b=draw(st.integers(1, 2)), hkv=hkv, hq=hkv * draw(st.integers(1, 2)),
                lq=draw(st.integers(1, 70)), lk=draw(st.integers(0, 70)),
                d=draw(st.sampled_from([8, 16, 32])), dtype=draw(st.sampled_from(FLOATS)),
                ids=draw(st.sampled_from(INTS)), sorted=draw(st.booleans()),
                num_sets=draw(st.integers(1, 6)), empty=draw(st.booleans()),
                strict=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.3, -0.7])),
                layout=draw(st.sampled_from(["contiguous", "blhd"])),
                poison=draw(st.sampled_from(POISON)), seed=draw(st.integers(0, 2**31)))


def attention_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])

    def tensor(h, length):
        shape = (c["b"], length, h, c["d"]) if c["layout"] == "blhd" else (c["b"], h, length, c["d"])
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(c["dtype"])
        return t.transpose(1, 2) if c["layout"] == "blhd" else t

    q, k, v = tensor(c["hq"], c["lq"]), tensor(c["hkv"], c["lk"]), tensor(c["hkv"], c["lk"])
    ids = lambda n: torch.randint(0, c["num_sets"], (c["b"], n), generator=gen)
    q_sets, k_sets = ids(c["lq"]), ids(c["lk"])
    if c["sorted"]:
        q_sets, k_sets = q_sets.sort(-1).values, k_sets.sort(-1).values
    k_sets += 1  # ids >= 1: queries of set 0 see no key unless ids are lower-or-equal ...
    if not c["empty"]:
        q_sets += 1  # ... and with `empty` they never do
    else:
        q_sets[:, ::4] = 0
    if c["poison"] is not None:
        target = {"q": q, "k": k, "v": v}[c["poison"][-1]]
        if target.numel():
            value = float("nan") if c["poison"].startswith("nan") else float("inf")
            at = [int(torch.randint(0, n, (), generator=gen)) for n in target.shape]
            target[tuple(at)] = value
    return q, k, v, q_sets.to(c["ids"]), k_sets.to(c["ids"])


def attention(q, k, v, q_sets, k_sets, c, g_out, g_lse):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = sarkernels.set_attention(*leaves, q_sets, k_sets, strict=c["strict"],
                                        scale=c["scale"], return_lse=True)
    lse_term = torch.where(lse.isfinite(), lse, 0.0) * g_lse
    grads = torch.autograd.grad((out * g_out).sum() + lse_term.sum(), leaves)
    return out.detach(), lse.detach(), *grads


@examples
@given(attention_cases())
def test_set_attention(c):
    q, k, v, q_sets, k_sets = attention_inputs(c)
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    g_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(c["dtype"])
    g_lse = torch.randn(q.shape[:3], generator=gen)
    with sarkernels.use_backend("reference"):
        want = attention(*(t.double() for t in (q, k, v)), q_sets.long(), k_sets.long(), c,
                         g_out.double(), g_lse.double())
    rows, keys, empty = non_finite_reach(q, k, v, q_sets, k_sets, c["strict"])
    for name, got in run_all(lambda: attention(q, k, v, q_sets, k_sets, c, g_out, g_lse)).items():
        out, lse, dq, dk, dv = got
        w_out, w_lse, w_dq, w_dk, w_dv = want
        assert out.dtype == c["dtype"]
        assert lse.dtype == (torch.float64 if c["dtype"] == torch.float64 else torch.float32)
        assert torch.equal(lse.isnan(), w_lse.isnan()), f"{name}: lse NaN rows"
        assert torch.equal(lse.isneginf(), w_lse.isneginf()), f"{name}: -inf lse rows"
        assert lse[empty].isneginf().all(), f"{name}: rows with no visible key"
        assert not out[empty].any() and not dq[empty].any(), f"{name}: empty rows not zero"
        for what, a, w, where in (("out", out, w_out, rows),
                                  ("lse", lse, w_lse, rows | w_lse.isneginf()),
                                  ("dq", dq, w_dq, rows), ("dk", dk, w_dk, keys),
                                  ("dv", dv, w_dv, keys)):
            clean = ~where
            assert a[clean].isfinite().all(), f"{name}: {what} not finite outside the reach"
            assert_agrees(a[clean], w[clean], c["dtype"], f"{name} {what}")


# ---------------------------------------------------------------- kv_cache_append

@st.composite
def cache_cases(draw):
    slots = draw(st.integers(1, 12))
    return dict(b=draw(st.integers(1, 2)), h=draw(st.integers(1, 3)), slots=slots,
                n=draw(st.integers(0, slots)), d=draw(st.sampled_from([8, 16])),
                dtype=draw(st.sampled_from(FLOATS)), ids=draw(st.sampled_from(INTS)),
                cache_layout=draw(st.sampled_from(["contiguous", "slice", "bshd"])),
                new_layout=draw(st.sampled_from(["contiguous", "bnhd"])),
                bad=draw(st.sampled_from([None, None, "repeat", "high", "negative"])),
                seed=draw(st.integers(0, 2**31)))


def cache_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(c["dtype"])
    b, h, s, n, d = c["b"], c["h"], c["slots"], c["n"], c["d"]
    if c["cache_layout"] == "slice":  # slots and columns of a larger buffer
        caches = [rnd(b, h, s + 3, d + 8)[:, :, 1:s + 1, 4:4 + d] for _ in range(2)]
    elif c["cache_layout"] == "bshd":
        caches = [rnd(b, s, h, d).transpose(1, 2) for _ in range(2)]
    else:
        caches = [rnd(b, h, s, d) for _ in range(2)]
    new = [rnd(b, n, h, d).transpose(1, 2) if c["new_layout"] == "bnhd" else rnd(b, h, n, d)
           for _ in range(2)]
    if n:
        new[0][0, 0, 0, 0] = float("nan")  # values are copied as bits
    slots = torch.stack([torch.randperm(s, generator=gen)[:n] for _ in range(b)])
    if n and c["bad"] == "repeat" and n > 1:
        slots[-1, -1] = slots[-1, 0]
    elif n and c["bad"] == "high":
        slots[-1, -1] = s
    elif n and c["bad"] == "negative" and c["ids"] != torch.uint8:
        slots[-1, -1] = -1
    return caches, new, slots.to(c["ids"])


@examples
@given(cache_cases())
def test_kv_cache_append(c):
    caches, new, slots = cache_inputs(c)
    want = [t.clone() for t in caches]
    s = slots.long()
    valid = bool(((s >= 0) & (s < c["slots"])).all()) and all(
        len(set(row)) == len(row) for row in s.tolist())
    if valid:
        for bi in range(c["b"]):
            for i, slot in enumerate(s[bi].tolist()):
                for w, x in zip(want, new):
                    w[bi, :, slot] = x[bi, :, i]

    def append():
        k_cache, v_cache = (t.clone() for t in caches)
        try:
            sarkernels.kv_cache_append(k_cache, v_cache, *new, slots)
        except ValueError as e:
            return "ValueError", k_cache, v_cache, str(e)
        return None, k_cache, v_cache, ""

    for name, (error, k_cache, v_cache, message) in run_all(append).items():
        assert (error is None) == valid, f"{name}: {'raised ' + message if error else 'no error'}"
        expect = want if valid else caches  # a refused call writes nothing
        assert torch.equal(bits(k_cache), bits(expect[0])), f"{name}: k_cache"
        assert torch.equal(bits(v_cache), bits(expect[1])), f"{name}: v_cache"


# ---------------------------------------------------------------- interleave

@st.composite
def interleave_cases(draw):
    heads = draw(st.integers(1, 3))
    grid = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    return dict(b=draw(st.integers(1, 2)), n=draw(st.integers(0, grid[0] * grid[1])),
                heads=heads, d=heads * draw(st.sampled_from([4, 8])), grid=grid,
                prefix=draw(st.integers(0, 3)), merge=draw(st.booleans()),
                table=draw(st.booleans()), strided=draw(st.booleans()),
                dtype=draw(st.sampled_from(FLOATS)), ids=draw(st.sampled_from(INTS)),
                poison=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


def interleave(tokens, positions, instruction, prefix, c):
    leaves = [t.detach().clone().requires_grad_() for t in (tokens, instruction, prefix)]
    out = sarkernels.interleave_position_instructions(
        leaves[0], positions, leaves[1], num_heads=c["heads"], grid_size=c["grid"],
        prefix=leaves[2], merge=c["merge"])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(c["seed"] + 1),
                    dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad((out * g).sum(), leaves, allow_unused=True)
    return out.detach(), *(torch.zeros_like(t) if gr is None else gr
                           for t, gr in zip(leaves, grads))


@examples
@given(interleave_cases())
def test_interleave_position_instructions(c):
    gen = torch.Generator().manual_seed(c["seed"])
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(c["dtype"])
    cells = c["grid"][0] * c["grid"][1]
    b, n, d = c["b"], c["n"], c["d"]
    tokens = rnd(b, d, n).transpose(1, 2) if c["strided"] else rnd(b, n, d)
    positions = torch.stack([torch.randperm(cells, generator=gen)[:n] for _ in range(b)])
    instruction = rnd(cells, d) if c["table"] else rnd(d)
    prefix = rnd(b, max(c["prefix"], int(c["merge"])), d)
    if c["poison"] and n:
        tokens[0, 0, 0] = float("nan")  # reaches its own output row only
    want = interleave(tokens.double(), positions.long(), instruction.double(), prefix.double(), c)
    for name, got in run_all(lambda: interleave(tokens, positions.to(c["ids"]), instruction,
                                                prefix, c)).items():
        for what, a, w in zip(("out", "d tokens", "d instruction", "d prefix"), got, want):
            assert a.dtype == c["dtype"]
            assert torch.equal(a.isnan(), w.isnan()), f"{name}: {what} NaN pattern"
            finite = ~w.isnan()
            assert_agrees(a[finite], w[finite], c["dtype"], f"{name} {what}")
