"""set_attention on non-finite inputs and extreme set ids: one rule on every backend.

A row with no visible key (or only -inf logits) is zero with lse -inf; a NaN or +inf
visible logit, or a non-finite value of a visible key, makes the row and its lse NaN; keys
a row does not see never affect it.
"""
import pytest
import torch

import sarkernels
from conftest import attention_inputs, non_finite_reach

NAN, INF = float("nan"), float("inf")
I64 = torch.iinfo(torch.int64)


def rule_oracle(q, k, v, q_sets, k_sets, strict, scale=None):
    """The rule row by row in float64, with visibility decided on Python ints."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], -INF, dtype=torch.float64)
    qs, ks = q_sets.tolist(), k_sets.tolist()
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                seen = [j for j, kj in enumerate(ks[b]) if (kj < qs[b][i] if strict else kj <= qs[b][i])]
                if not seen:
                    continue
                kv, vv = k[b, h // group, seen], v[b, h // group, seen]
                logits = kv @ q[b, h, i] * scale
                if logits.isnan().any() or logits.isposinf().any() or not vv.isfinite().all():
                    out[b, h, i], lse[b, h, i] = NAN, NAN
                elif (logits > -INF).any():
                    lse[b, h, i] = logits.logsumexp(0)
                    out[b, h, i] = (logits - lse[b, h, i]).exp() @ vv
    return out, lse


def inputs(dtype):
    """Two batch rows of 40 sorted set ids; batch row 1 starts with queries that see no key."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = attention_inputs(2, 2, 1, 40, 40, 16, gen, dtype)
    sets = torch.randint(0, 12, (2, 40), generator=gen).sort(-1).values
    q_sets = sets.clone()
    q_sets[1, :3] = -1
    return q, k, v, q_sets, sets


def corrupt(case, q, k, v):
    """Puts a NaN or inf into q, k or v (and, for inf in k, queries of every sign)."""
    if case == "nan_q":
        q[0, 0, 5, 3] = NAN
        q[1, 1, 0, 2] = NAN  # a row with no visible key
    elif case in ("inf_k", "neg_inf_k"):
        k[:, 0, 0, 0] = INF if case == "inf_k" else -INF
        q[:, :, :3, 0] = -1.0  # a -inf logit (weight 0) for inf, +inf (NaN row) for -inf
        q[:, :, 20, 0] = 0.0  # 0 * inf is NaN
    elif case == "nan_k":
        k[0, 0, 12, 5] = NAN
    elif case == "nan_v":
        v[0, 0, 12, 5] = NAN
        v[1, 0, 30, 0] = NAN
    elif case == "inf_v":
        v[0, 0, 3, 1] = INF
        v[1, 0, 39, 2] = -INF


CASES = ["nan_q", "inf_k", "neg_inf_k", "nan_k", "nan_v", "inf_v"]


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_non_finite_inputs_follow_the_rule(backend, case, dtype, strict):
    q, k, v, q_sets, k_sets = inputs(dtype)
    corrupt(case, q, k, v)
    out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, strict=strict, return_lse=True)
    want_out, want_lse = rule_oracle(q, k, v, q_sets, k_sets, strict)
    nan_rows = want_lse.isnan()
    assert nan_rows.any() and (~nan_rows & want_lse.isfinite()).any()  # the case bites
    assert torch.equal(lse.isnan(), nan_rows) and torch.equal(out.isnan().all(-1), nan_rows)
    assert not out[~nan_rows].isnan().any()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.double(), want_out, equal_nan=True, **tol)
    torch.testing.assert_close(lse.double(), want_lse, equal_nan=True, **tol)


@pytest.mark.parametrize("d", [80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("where", ["k", "v"])
def test_non_finite_values_in_any_chunk_of_a_wide_row(backend, where, dtype, d):
    """Keys and values scrubbed by whichever thread copied the chunk: at head dims past 64
    a thread copies two or more 16-byte chunks of a row (ChunkMap), and a NaN in the last
    one, or an inf in the first, must make exactly the rows that see it NaN."""
    gen = torch.Generator().manual_seed(d)
    q, k, v = attention_inputs(1, 2, 1, 40, 40, d, gen, dtype)
    sets = torch.randint(0, 10, (1, 40), generator=gen).sort(-1).values
    t = k if where == "k" else v
    t[0, 0, 7, d - 1] = NAN
    t[0, 0, 33, 2] = INF if where == "v" else NAN
    out, lse = sarkernels.set_attention(q, k, v, sets, sets, return_lse=True)
    _, want_lse = rule_oracle(q, k, v, sets, sets, False)
    nan_rows = want_lse.isnan()
    assert nan_rows.any() and not nan_rows.all()
    assert torch.equal(lse.isnan(), nan_rows) and torch.equal(out.isnan().all(-1), nan_rows)
    assert not out[~nan_rows].isnan().any()


def test_all_minus_inf_logits_make_an_empty_row(backend):
    q, k, v, q_sets, k_sets = inputs(torch.float64)
    k_sets[0], q_sets[0, 0] = torch.arange(40), 0  # query 0 sees key 0 alone
    k[0, 0, 0, 0], q[0, :, 0, 0] = INF, -1.0
    out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, return_lse=True)
    assert torch.equal(out[0, :, 0], torch.zeros_like(out[0, :, 0]))
    assert lse[0, :, 0].isneginf().all()


def cleaned(case, q, k, v):
    """q, k, v with the case's non-finite values replaced by finite random ones."""
    dirty = [t.clone() for t in (q, k, v)]
    corrupt(case, *dirty)
    return [torch.where(d.isfinite(), d, torch.randn_like(d)) for d in dirty], dirty


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_a_non_finite_value_reaches_only_rows_and_keys_that_see_it(backend, case, strict):
    """Out, lse and every gradient away from the value's reach are those of finite inputs
    (rows 4 and 5 of issue 28: an inf key or a NaN query hidden from a row made its dq, or
    every key's dk, NaN)."""
    q, k, v, q_sets, k_sets = inputs(torch.float64)
    (clean, dirty) = cleaned(case, q, k, v)
    rows, keys, empty = non_finite_reach(*dirty, q_sets, k_sets, strict)
    # (The rows that see a key see every lower one: a poisoned key leaves unreached only keys
    # that no row reached sees; a NaN query of a row leaves the keys above that row's set.)
    assert rows.any() and (~rows).any() and (case != "nan_q" or (~keys).any())
    results = []
    for inputs_ in (clean, dirty):
        leaves = [t.clone().requires_grad_() for t in inputs_]
        out, lse = sarkernels.set_attention(*leaves, q_sets, k_sets, strict=strict,
                                            return_lse=True)
        grads = torch.autograd.grad((out.sum(-1) + lse.nan_to_num(neginf=0.0)).sum(), leaves)
        results.append((out, lse, *grads))
    (out, lse, dq, dk, dv), (out_, lse_, dq_, dk_, dv_) = results
    for a, b, where in ((out, out_, rows), (lse, lse_, rows | empty), (dq, dq_, rows),
                        (dk, dk_, keys), (dv, dv_, keys)):
        assert b[~where].isfinite().all()
        torch.testing.assert_close(b[~where], a[~where], atol=1e-12, rtol=1e-12)
    assert empty.any() and torch.equal(dq_[empty], torch.zeros_like(dq_[empty]))


def test_empty_row_with_nan_query_has_zero_gradient(backend):
    q, k, v, q_sets, k_sets = inputs(torch.float64)
    q[1, :, 0] = NAN  # batch row 1's first queries see no key
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = sarkernels.set_attention(q, k, v, q_sets, k_sets)
    dq, = torch.autograd.grad(out[1].sum(), q)
    assert torch.equal(dq[1, :, :3], torch.zeros_like(dq[1, :, :3]))
    assert dq[1, :, 3:].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale,case", [(NAN, None), (0.0, "nan_q"), (0.0, "inf_k"),
                                        (INF, None), (-INF, None)])
def test_special_scales_follow_the_rule(backend, scale, case, dtype):
    """The logit is scale * (q . k) in IEEE arithmetic whatever the scale (rows 1-3 of issue
    28: the CPU kernels folded the scale into BLAS's alpha, which skips the product for 0,
    ignores NaN and turned an inf scale of negative dot products into NaN rows)."""
    q, k, v, q_sets, k_sets = inputs(dtype)
    if case is not None:
        corrupt(case, q, k, v)
    first = q_sets[0] == k_sets[0, 0]  # batch row 0's first queries see its first keys alone
    if abs(scale) == INF:  # dot products of the sign that an infinite scale takes to -inf
        k[0, :, k_sets[0] == k_sets[0, 0]] = 1.0
        q[0, :, first] = -1.0 if scale > 0 else 1.0
    out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, scale=scale, return_lse=True)
    want_out, want_lse = rule_oracle(q, k, v, q_sets, k_sets, False, scale)
    empty = want_lse.isneginf()
    assert want_lse.isnan().any() and empty.any()
    assert empty[0, :, first].all() == (abs(scale) == INF)
    assert torch.equal(lse.isnan(), want_lse.isnan()) and torch.equal(lse.isneginf(), empty)
    torch.testing.assert_close(out.double(), want_out, equal_nan=True, atol=1e-5, rtol=1e-5)


# Every integer dtype set ids may have, with the ids of each that wrap when narrowed or
# reinterpreted (uint8 200 as int8 is -56, uint32 2^32 - 1 as int32 is -1).
ID_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16,
             torch.uint32]


def extreme_ids(dtype):
    info = torch.iinfo(dtype)
    return sorted({i for i in (info.min, info.min + 1, -1, 0, 1, info.max // 2 + 1,
                               info.max - 1, info.max) if info.min <= i <= info.max})


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=str)
@pytest.mark.parametrize("sort", [False, True])
def test_extreme_set_ids(backend, id_dtype, strict, sort):
    gen = torch.Generator().manual_seed(4)
    q, k, v = attention_inputs(2, 2, 2, 21, 35, 8, gen)
    values = torch.tensor(extreme_ids(id_dtype))
    q_sets = values[torch.arange(21) % len(values)].expand(2, 21).clone()
    k_sets = values[torch.randint(0, len(values), (2, 35), generator=gen)]
    if sort:
        q_sets, k_sets = q_sets.sort(-1).values, k_sets.sort(-1).values
    out, lse = sarkernels.set_attention(q, k, v, q_sets.to(id_dtype), k_sets.to(id_dtype),
                                        strict=strict, return_lse=True)
    want_out, want_lse = rule_oracle(q, k, v, q_sets, k_sets, strict)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
    if strict:  # the smallest id sees nothing (q_set - 1 would wrap and show every key)
        smallest = q_sets[0] == values[0]
        assert smallest.any() and lse[:, :, smallest].isneginf().all()


@pytest.mark.parametrize("name", ["q_sets", "k_sets"])
def test_uint64_set_ids_are_refused(backend, name):
    """uint64 ids from 2^63 have no int64 equal: refused, not wrapped to negative ids."""
    q, k, v, q_sets, k_sets = inputs(torch.float32)
    sets = dict(q_sets=q_sets, k_sets=k_sets)
    sets[name] = torch.full_like(sets[name], 2**63, dtype=torch.uint64)
    with pytest.raises(TypeError, match=f"set_attention: {name} must be an integer tensor of a "
                                        "dtype other than uint64.*got torch.uint64"):
        sarkernels.set_attention(q, k, v, **sets)


@pytest.mark.parametrize("case", ["nan_v", "inf_v"])
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.float16, 64),
                                     (torch.float32, 64), (torch.float64, 128)])
def test_a_non_finite_value_in_fully_visible_tiles(backend, case, dtype, d):
    """The fused kernels scrub values only in tiles some row of the block does not see; in a
    tile every row sees (keys 0-127 here: two whole 64-key tiles in set 0), the row's output
    itself must carry a value's NaN/inf to out and lse. float64 at d=128 splits the output
    columns over blocks, so each block sees only part of a row."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = attention_inputs(1, 2, 2, 200, 150, d, gen, dtype)
    tail = torch.randint(1, 6, (22,), generator=gen).sort().values
    k_sets = torch.cat([torch.zeros(128, dtype=torch.long), tail])[None]
    q_sets = torch.randint(0, 6, (1, 200), generator=gen).sort(-1).values
    v[0, 1, 70, d - 1] = NAN if case == "nan_v" else INF
    out, lse = sarkernels.set_attention(q, k, v, q_sets, k_sets, return_lse=True)
    assert lse[0, 1].isnan().all() and out[0, 1].isnan().all()  # every query sees key 70
    assert lse[0, 0].isfinite().all() and out[0, 0].isfinite().all()


@pytest.mark.parametrize("lq,lk", [(40, 2100), (2100, 40)])
def test_more_key_or_query_tiles_than_one_walk_chunk(backend, lq, lk):
    """The kernels list the tiles they need 64 at a time: float32 key tiles of 32 (forward)
    and query tiles of 32 (dK/dV), so 2100 keys or queries take two chunks."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = attention_inputs(1, 2, 1, lq, lk, 16, gen, torch.float32)
    q_sets = torch.randint(0, 9, (1, lq), generator=gen).sort(-1).values
    k_sets = torch.randint(0, 9, (1, lk), generator=gen)  # unsorted: partial tiles too
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = sarkernels.set_attention(*leaves, q_sets, k_sets, return_lse=True)
    grads = torch.autograd.grad(out.sum() + lse.nan_to_num(0, 0, 0).sum(), leaves)
    with sarkernels.use_backend("reference"):
        ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
        r_out, r_lse = sarkernels.set_attention(*ref, q_sets, k_sets, return_lse=True)
        r_grads = torch.autograd.grad(r_out.sum() + r_lse.nan_to_num(0, 0, 0).sum(), ref)
    torch.testing.assert_close(out.double(), r_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), r_lse, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, r_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("spread", ["near", "far", pytest.param("extreme", marks=pytest.mark.asan)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_set_ids_near_and_far_apart(backend, dtype, spread, strict, deterministic):
    """The fused kernels test partial tiles on 32-bit codes of the ids relative to the
    block's rows: offsets where a block's ids span less than 2^30 ("near", keys of other
    blocks clamped), counts over the block's rows otherwise ("far": 2^40 apart; "extreme":
    the int64 ends among them). Sorted queries, unsorted keys, ragged tiles; forward and
    both backward paths against the reference."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = attention_inputs(1, 2, 1, 150, 140, 64, gen, dtype)
    step = {"near": 1, "far": 1 << 40, "extreme": 1 << 40}[spread]
    q_sets = torch.randint(0, 7, (1, 150), generator=gen).sort(-1).values * step
    k_sets = torch.randint(-1, 8, (1, 140), generator=gen) * step
    if spread == "extreme":
        q_sets[0, 60:64] = torch.tensor([I64.min, I64.min + 1, I64.max - 1, I64.max])
        k_sets[0, ::9] = torch.tensor([I64.min, I64.max])[torch.arange(16) % 2]
    leaves = [t.requires_grad_() for t in (q, k, v)]
    torch.use_deterministic_algorithms(deterministic)
    try:
        out, lse = sarkernels.set_attention(*leaves, q_sets, k_sets, strict=strict,
                                            return_lse=True)
        grads = torch.autograd.grad(out.float().sum() + lse.nan_to_num(0, 0, 0).sum(), leaves)
    finally:
        torch.use_deterministic_algorithms(False)
    with sarkernels.use_backend("reference"):
        ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
        r_out, r_lse = sarkernels.set_attention(*ref, q_sets, k_sets, strict=strict,
                                                return_lse=True)
        r_grads = torch.autograd.grad(r_out.sum() + r_lse.nan_to_num(0, 0, 0).sum(), ref)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.equal(lse.isneginf(), r_lse.isneginf())
    torch.testing.assert_close(out.double(), r_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), r_lse, atol=tol, rtol=tol)
    for g, r in zip(grads, r_grads):
        torch.testing.assert_close(g.double(), r, atol=5 * tol, rtol=5 * tol)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("lq,lk", [(17, 0), (0, 5), (40, 0)])
def test_no_keys_or_no_queries(backend, lq, lk, deterministic):
    """Zero-length operands: every row is empty (zeros, lse -inf, zero gradients). On a GPU
    the fused kernels then walk no tile at all, and must still wait for their own loads."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = attention_inputs(1, 2, 2, lq, lk, 64, gen, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    torch.use_deterministic_algorithms(deterministic)
    try:
        out, lse = sarkernels.set_attention(*leaves, torch.zeros(1, lq, dtype=torch.long),
                                            torch.zeros(1, lk, dtype=torch.long), return_lse=True)
        grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(out, torch.zeros_like(out)) and lse.isneginf().all()
    for g, t in zip(grads, leaves):
        assert g is None or torch.equal(g, torch.zeros_like(t))
