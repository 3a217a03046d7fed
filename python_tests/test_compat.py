"""sarkernels.compat: sets_from_mask, sdpa, use_sarkernels_sdpa; [L] set ids; KVCache as a
module."""
import re
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st

import sarkernels
from conftest import HAS_SIMT
from sarkernels import compat, ops, reference
from sarkernels.compat import NotASetMask, sdpa, sets_from_mask, use_sarkernels_sdpa
from sarkernels.compat import torch_sdpa as sdpa_module
from sarkernels.nn import UNWRITTEN, KVCache, SetAttention

# ---------------------------------------------------------------- sets_from_mask


@st.composite
def id_masks(draw):
    b, lq, lk = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    ids = st.integers(-2, 4)
    q = torch.tensor(draw(st.lists(st.lists(ids, min_size=lq, max_size=lq), min_size=b, max_size=b)))
    k = torch.tensor(draw(st.lists(st.lists(ids, min_size=lk, max_size=lk), min_size=b, max_size=b)))
    return reference.visible(q, k, draw(st.booleans()))


@given(id_masks())
def test_set_masks_give_ids_of_the_same_visibility(mask):
    q_sets, k_sets = sets_from_mask(mask)
    assert torch.equal(reference.visible(q_sets, k_sets), mask)
    q2, k2 = sets_from_mask(mask[0])  # [L, S] masks give [L] and [S] ids
    assert q2.shape == mask.shape[1:2] and torch.equal(reference.visible(q2[None], k2[None]), mask[:1])


def first_conflict(mask):
    """By brute force: the first row whose keys are not nested with an earlier row's."""
    for i in range(len(mask)):
        for r in range(i):
            if (mask[i] & ~mask[r]).any() and (mask[r] & ~mask[i]).any():
                return i
    return None


@given(st.integers(2, 8), st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_other_masks_are_refused_naming_the_first_row(rows, cols, seed):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < 0.5
    row = first_conflict(mask)
    assume(row is not None)
    with pytest.raises(NotASetMask) as info:
        sets_from_mask(mask)
    i, key, other_key, other = map(int, re.search(
        r"row (\d+) sees key (\d+) but not key (\d+), which row (\d+) sees", str(info.value)).groups())
    assert i == row and other < row
    assert mask[i, key] and not mask[i, other_key] and mask[other, other_key] and not mask[other, key]


def test_mask_rules():
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert [t.tolist() for t in sets_from_mask(causal)] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    padded = torch.tensor([[True, True, False]] * 2 + [[False] * 3])  # an empty row: id -1
    q, k = sets_from_mask(padded)
    assert q.tolist() == [1, 1, -1] and torch.equal(reference.visible(q[None], k[None])[0], padded)
    additive = torch.zeros(4, 4).masked_fill(~causal, float("-inf"))
    assert torch.equal(sets_from_mask(additive)[0], sets_from_mask(causal)[0])
    with pytest.raises(NotASetMask, match=r"only 0 \(attend\) and -inf .*got -10000.0 at \[0, 1\]"):
        sets_from_mask(torch.zeros(4, 4).masked_fill(~causal, -1e4))
    heads = torch.stack([causal, causal.T])[None]  # [1, 2, L, S]: one mask per head
    with pytest.raises(NotASetMask, match=r"mask\[0, 1\] differs from mask\[0, 0\]: .*per-head"):
        sets_from_mask(heads)
    assert sets_from_mask(torch.stack([causal, causal])[None])[0].shape == (1, 4)
    with pytest.raises(TypeError, match="mask must be bool or floating point, got torch.int64"):
        sets_from_mask(causal.long())
    with pytest.raises(ValueError, match=r"mask must be \[L, S\], .*got shape \[4\]"):
        sets_from_mask(causal[0])


# ---------------------------------------------------------------- sdpa


def masks(lq, lk, b):
    """Set masks of each kind SDPA users build, as SDPA takes them."""
    causal = torch.ones(lq, lk, dtype=torch.bool).tril()
    block = (torch.arange(lq) // 3)[:, None] >= (torch.arange(lk) // 3)[None]
    lengths = torch.tensor([lk, lk - 3])[:b]
    padding = (torch.arange(lk)[None] < lengths[:, None])[:, None, None]  # [B, 1, 1, S]
    prefix = causal | (torch.arange(lk) < 4)[None]  # prefix-LM: the first 4 keys for all
    return {"causal bool": causal, "block-causal": block, "key padding": padding,
            "prefix-LM": prefix, "causal + padding": causal & padding,
            "additive": torch.zeros(lq, lk, dtype=torch.float64).masked_fill(~block, float("-inf"))}


def check_against_torch(q, k, v, **kwargs):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    copies = [t.detach().requires_grad_() for t in (q, k, v)]
    ours = sdpa(*leaves, fallback="error", **kwargs)
    theirs = F.scaled_dot_product_attention(*copies, **kwargs)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(ours)
    for mine, other in zip(torch.autograd.grad(ours, leaves, grad),
                           torch.autograd.grad(theirs, copies, grad)):
        torch.testing.assert_close(mine, other, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["causal bool", "block-causal", "key padding", "prefix-LM",
                                  "causal + padding", "additive"])
def test_set_masks_match_torch(backend, kind):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 10, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    check_against_torch(q, k, v, attn_mask=masks(10, 10, 2)[kind], enable_gqa=True)


@pytest.mark.parametrize("lq,lk", [(7, 7), (5, 9), (9, 5)])
def test_is_causal_is_top_left_aligned_like_torch(backend, lq, lk):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, lq, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, lk, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    check_against_torch(q, k, v, is_causal=True, scale=0.3)


@pytest.mark.parametrize("shape", ["3-D", "MQA broadcast", "no mask"])
def test_layouts_match_torch(backend, shape):
    gen = torch.Generator().manual_seed(2)
    if shape == "3-D":
        q, k, v = (torch.randn(2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3))
        return check_against_torch(q, k, v, attn_mask=masks(6, 6, 2)["key padding"][:, 0])
    q = torch.randn(1, 4, 6, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 6, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    check_against_torch(q, k, v, is_causal=shape == "MQA broadcast")


@pytest.mark.skipif(not HAS_SIMT, reason="sarkernels._simt not built")
def test_simt_runs_a_dense_mask():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    with sarkernels.use_backend("simt"):
        check_against_torch(q, k, v, attn_mask=masks(8, 8, 1)["prefix-LM"])


def window(length):
    i = torch.arange(length)
    return (i[None] <= i[:, None]) & (i[None] > i[:, None] - 3)


def test_other_calls_fall_back_counted_or_raise():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen) for _ in range(3))
    per_head = torch.stack([window(8), window(8).T])
    cases = {"not a set mask": dict(attn_mask=window(8)),
             "dropout": dict(dropout_p=0.5),
             "mask requires grad": dict(attn_mask=torch.zeros(8, 8, requires_grad=True)),
             "head dim": dict(query=q[..., :12], key=k[..., :12], value=v[..., :12])}
    compat.reset_fallback_counts()
    for kind, kwargs in cases.items():
        args = {"query": q, "key": k, "value": v, **kwargs}
        torch.manual_seed(0)
        ours = sdpa(**args)
        torch.manual_seed(0)
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(**args))
        with pytest.raises(ValueError, match="sdpa: cannot run on set attention"):
            sdpa(**args, fallback="error")
    sdpa(q, k, v, attn_mask=per_head)
    assert compat.fallback_counts() == {**dict.fromkeys(cases, 1), "not a set mask": 2}
    with pytest.raises(ValueError, match=r"attn_mask is not a set mask: row 3 sees key 1 but not "
                                         r"key 0, which row 0 sees without key 1"):
        sdpa(q, k, v, attn_mask=window(8), fallback="error")
    with pytest.raises(ValueError, match=r"mask\[0, 1\] differs from mask\[0, 0\]"):
        sdpa(q, k, v, attn_mask=per_head, fallback="error")
    three_heads = torch.ones(3, 8, 8, dtype=torch.bool)  # for 2 heads: torch says what is wrong
    with pytest.raises(RuntimeError):
        sdpa(q, k, v, attn_mask=three_heads)
    with pytest.raises(ValueError, match=r"attn_mask \[3, 8, 8\] does not broadcast to the scores "
                                         r"\[1, 2, 8, 8\]"):
        sdpa(q, k, v, attn_mask=three_heads, fallback="error")
    with pytest.raises(ValueError, match="fallback must be 'sdpa' or 'error', got 'torch'"):
        sdpa(q, k, v, fallback="torch")


def test_a_mask_is_converted_once_per_tensor_and_version(monkeypatch):
    calls = []
    convert = sdpa_module._convert
    monkeypatch.setattr(sdpa_module, "_convert", lambda *a: calls.append(1) or convert(*a))
    q = k = v = torch.randn(1, 2, 8, 16)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    for _ in range(3):
        sdpa(q, k, v, attn_mask=mask)
    assert len(calls) == 1
    mask[:, 0] = True  # an in-place write: converted again, and the new mask is used
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert len(calls) == 2
    sdpa(q, k, v, attn_mask=mask.clone())  # another tensor, even with equal values
    assert len(calls) == 3


def test_float_masks_take_torchs_dtypes():
    """torch takes a bool mask, a float32 one or one of the query's dtype; it raises for others."""
    q = k = v = torch.randn(1, 2, 4, 8)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    for dtype in (torch.float64, torch.float16, torch.long):
        mask = torch.zeros(4, 4).masked_fill(~causal, float("-inf")).to(dtype) \
            if dtype.is_floating_point else causal.to(dtype)
        with pytest.raises(RuntimeError, match="Expected attn_mask dtype to be bool or float"):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with pytest.raises(RuntimeError, match="Expected attn_mask dtype to be bool or float"):
            sdpa(q, k, v, attn_mask=mask)
        with pytest.raises(ValueError, match=f"attn_mask of dtype {dtype} with a torch.float32 "
                                             f"query: SDPA takes a bool mask, a float32 one"):
            sdpa(q, k, v, attn_mask=mask, fallback="error")
    additive = torch.zeros(4, 4).masked_fill(~causal, float("-inf"))  # float32, float64 query
    check_against_torch(*(t.double() for t in (q, k, v)), attn_mask=additive)


def test_one_row_bool_masks_are_set_ids_without_conversion(backend, monkeypatch):
    monkeypatch.setattr(sdpa_module, "_convert", lambda *a: pytest.fail("converted"))
    gen = torch.Generator().manual_seed(6)
    keep = torch.rand(2, 9, generator=gen) < 0.6
    keep[1] = False  # a row that sees nothing: zeros, as torch
    q, k, v = (torch.randn(2, 2, n, 8, generator=gen, dtype=torch.float64) for n in (1, 9, 9))
    for mask in (keep[:, None, None], keep[:1]):  # [B, 1, 1, S], [1, S]
        check_against_torch(q, k, v, attn_mask=mask)
    with pytest.raises(IndexError):  # torch takes no [S] mask
        sdpa(q, k, v, attn_mask=keep[0])
    with pytest.raises(ValueError, match=r"attn_mask must be \[L, S\] or more dims, got \[9\]"):
        sdpa(q, k, v, attn_mask=keep[0], fallback="error")
    q3 = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)  # 3-D, one row for 5 queries
    check_against_torch(q3, k[:, 0], v[:, 0], attn_mask=keep[:, None])
    traced = torch.compile(sdpa, backend="eager", fullgraph=True)  # no check: no graph break
    torch.testing.assert_close(traced(q, k, v, attn_mask=keep[:, None, None]),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None]))
    torch.compiler.reset()
    monkeypatch.undo()
    per_head = torch.stack([keep, ~keep], 1)[:, :, None]  # [B, H, 1, S]: not one row per head
    with pytest.raises(ValueError, match=r"mask\[0, 1\] differs from mask\[0, 0\]"):
        sdpa(q, k, v, attn_mask=per_head, fallback="error")


def test_clear_mask_cache_forgets_writes_behind_torchs_back(backend):
    q = k = v = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    sdpa(q, k, v, attn_mask=mask)
    mask.numpy()[:, 0] = False  # shares the memory, leaves the version: the ids are stale
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not torch.allclose(sdpa(q, k, v, attn_mask=mask), want)
    compat.clear_mask_cache()
    torch.testing.assert_close(sdpa(q, k, v, attn_mask=mask), want)


# ---------------------------------------------------------------- use_sarkernels_sdpa


class TinyTransformer(torch.nn.Module):
    """A foreign model: it calls torch's SDPA by its module attribute."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return x + self.out(y.transpose(1, 2).flatten(2))


@pytest.fixture
def calls(monkeypatch):
    """Counts set_attention calls."""
    seen = []
    real = ops.set_attention
    monkeypatch.setattr(ops, "set_attention", lambda *a, **k: seen.append(1) or real(*a, **k))
    return seen


def test_the_context_manager_routes_torch_sdpa(backend, calls):
    torch.manual_seed(0)
    model, x = TinyTransformer(), torch.randn(2, 7, 32)
    mask = masks(7, 7, 2)["causal + padding"]
    want = [model(x), model(x, mask)]
    assert not calls
    with use_sarkernels_sdpa():
        got = [model(x), model(x, mask)]
    assert len(calls) == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    model(x)  # off again outside
    assert len(calls) == 2

    @use_sarkernels_sdpa(fallback="error")
    def decorated():
        return model(x, window(7))
    with pytest.raises(ValueError, match="attn_mask is not a set mask"):
        decorated()


def test_the_choice_is_per_thread(calls):
    model, x = TinyTransformer(), torch.randn(1, 5, 32)
    entered, done = threading.Event(), threading.Event()

    def other():
        entered.wait()
        model(x)  # runs while the main thread is inside the block
        done.set()
    thread = threading.Thread(target=other)
    thread.start()
    with use_sarkernels_sdpa():
        entered.set()
        done.wait()
        assert not calls
        model(x)
    thread.join()
    assert len(calls) == 1


def test_the_context_manager_under_torch_compile():
    torch.manual_seed(0)
    model, x = TinyTransformer(), torch.randn(2, 7, 32, requires_grad=True)
    graphs = []

    def record(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward
    want = model(x)
    torch.compiler.reset()
    with sarkernels.use_backend("reference" if not ops.backends()["cpu"]["usable"] else "auto"), \
            use_sarkernels_sdpa():
        got = torch.compile(model, backend=record)(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(model, backend="aot_eager")
        torch.autograd.grad(compiled(x).sum(), x)  # the backward compiles
    torch.compiler.reset()
    assert any("set_attention" in g for g in graphs) and not any("scaled_dot" in g for g in graphs)


# ---------------------------------------------------------------- [L] set ids, KVCache


def test_shared_ids_broadcast_over_the_batch(backend):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 6, 16, generator=gen) for _ in range(3))
    ids = torch.tensor([0, 1, 1, 2, 3, 3], dtype=torch.int32)
    batched = ids.expand(3, 6).contiguous()
    torch.testing.assert_close(sarkernels.set_attention(q, k, v, ids, ids),
                               sarkernels.set_attention(q, k, v, batched, batched))
    m = SetAttention(32, 2)
    x = torch.randn(3, 6, 32, generator=gen)
    torch.testing.assert_close(m(x, ids), m(x, batched))
    with pytest.raises(ValueError, match=r"k_sets must be \[B, Lk\] = \[3, 6\] \(or \[Lk\]\), got \[3, 5\]"):
        sarkernels.set_attention(q, k, v, ids, batched[:, :5])


def test_kv_cache_is_a_module():
    cache = KVCache(1, 1, 4, 8)
    assert dict(cache.state_dict()) == {} and set(dict(cache.named_buffers())) == {"k", "v", "sets"}
    assert set(KVCache(1, 1, 4, 8, persistent=True).state_dict()) == {"k", "v", "sets"}
    cache.to(torch.float64)
    assert cache.k.dtype == torch.float64 and cache.sets.dtype == torch.long
    cache.write(torch.ones(1, 1, 2, 8), torch.ones(1, 1, 2, 8), slots=torch.tensor([2, 1]))
    assert cache.sets.tolist() == [[UNWRITTEN, 1, 2, UNWRITTEN]]  # positions as set ids
    cache.write(torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8), slots=3)
    assert cache.sets.tolist() == [[UNWRITTEN, 1, 2, 3]] and cache.k.dtype == torch.float64
