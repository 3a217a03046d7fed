import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sarkernels
from conftest import NAMESPACES, bits


def expected(k_cache, v_cache, k, v, slots):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    for b in range(slots.shape[0]):
        for i in range(slots.shape[1]):
            k_cache[b, :, slots[b, i]] = k[b, :, i]
            v_cache[b, :, slots[b, i]] = v[b, :, i]
    return k_cache, v_cache


@given(b=st.integers(1, 3), h=st.integers(1, 3), s=st.integers(1, 40), n=st.integers(0, 8),
       d=st.sampled_from([1, 8, 24, 64]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       strided=st.booleans(), seed=st.integers(0, 2**31))
def test_matches_loop(backend, b, h, s, n, d, dtype, strided, seed):
    n = min(n, s)
    gen = torch.Generator().manual_seed(seed)
    # poisoned: a row the op should write but does not stays NaN
    k_cache = torch.full((b, h, s, d), float("nan"), dtype=dtype)
    v_cache = torch.full((b, h, s, d), float("nan"), dtype=dtype)
    if strided:  # new tokens in [B, n, H, D] layout, as a projection produces them
        k = torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)
        v = torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)
    else:
        k = torch.randn(b, h, n, d, generator=gen).to(dtype)
        v = torch.randn(b, h, n, d, generator=gen).to(dtype)
    slots = torch.stack([torch.randperm(s, generator=gen)[:n] for _ in range(b)])
    want_k, want_v = expected(k_cache, v_cache, k, v, slots)
    assert sarkernels.kv_cache_append(k_cache, v_cache, k, v, slots) is None
    assert torch.equal(bits(k_cache), bits(want_k)) and torch.equal(bits(v_cache), bits(want_v))


def test_overwrite_earlier_slots(backend):
    k_cache, v_cache = torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8)
    for step in range(3):  # RandAR re-writes the temporary query slots every step
        k = torch.full((1, 2, 2, 8), float(step + 1))
        sarkernels.kv_cache_append(k_cache, v_cache, k, -k, torch.tensor([[step + 1, step + 2]]))
    assert k_cache[0, 0, :, 0].tolist() == [0, 1, 2, 3, 3, 0]
    assert v_cache[0, 1, :, 0].tolist() == [0, -1, -2, -3, -3, 0]


@pytest.mark.parametrize("slots,match", [
    ([[0, 6]], r"slots\[0, 1\] = 6 is outside the cache \[0, 6\)"),
    ([[-1, 2]], r"slots\[0, 0\] = -1 is outside"),
    ([[3, 3]], r"slot 3 appears more than once in slots\[0\]"),
    # the first bad slot in row-major order; range errors before repeats
    ([[1, 1], [2, 7], [9, 0]], r"slots\[1, 1\] = 7 is outside"),
    ([[0, 1], [5, 5], [4, 4]], r"slot 5 appears more than once in slots\[1\]"),
    ([[0, 1], [5, 2], [4, 4]], r"slot 4 appears more than once in slots\[2\]"),
])
def test_bad_slots_write_nothing(backend, slots, match):
    slots = torch.tensor(slots)
    k_cache, v_cache = torch.zeros(len(slots), 2, 6, 8), torch.zeros(len(slots), 2, 6, 8)
    k = torch.ones(len(slots), 2, 2, 8)
    with pytest.raises(ValueError, match=match):
        sarkernels.kv_cache_append(k_cache, v_cache, k, k, slots)
    assert not k_cache.any() and not v_cache.any()


def unwritable_caches(case):
    buf = torch.zeros(2, 1, 2, 6, 8)
    if case == "leaf_requires_grad":
        return buf[0].clone().requires_grad_(), buf[1]
    if case == "leaf_v_requires_grad":
        return buf[0], buf[1].clone().requires_grad_()
    if case == "same_tensor":
        return buf[0], buf[0]
    if case == "overlapping_views":
        flat = torch.zeros(200)
        return flat[:96].view(1, 2, 6, 8), flat[48:144].view(1, 2, 6, 8)
    if case == "expanded":  # every slot is one memory location
        return torch.zeros(1, 2, 1, 8).expand(1, 2, 6, 8), buf[1]
    if case == "inference":
        with torch.inference_mode():
            return torch.zeros(1, 2, 6, 8), buf[1]
    if case in ("interleaved", "interleaved_shifted"):  # [B, S, 2, H, D], as paged caches are
        flat = torch.zeros(1 * 7 * 2 * 2 * 8)
        kv = flat[:192].view(1, 6, 2, 2, 8)
        shifted = flat[32:224].view(1, 6, 2, 2, 8)  # one slot on: its K is kv's V of slot 1
        v = kv[:, :, 1] if case == "interleaved" else shifted[:, :, 0]
        return kv[:, :, 0].transpose(1, 2), v.transpose(1, 2)
    return buf[0], buf[1]  # "halves": two disjoint views of one buffer are fine


@pytest.mark.parametrize("case,match", [
    ("leaf_requires_grad", "k_cache is a leaf tensor that requires grad"),
    ("leaf_v_requires_grad", "v_cache is a leaf tensor that requires grad"),
    ("same_tensor", "k_cache and v_cache overlap in memory"),
    ("overlapping_views", "k_cache and v_cache overlap in memory"),
    ("expanded", r"k_cache has stride 0 on dim 2 \(an expanded tensor"),
    ("inference", "k_cache is an inference tensor"),
    ("interleaved_shifted", "k_cache and v_cache overlap in memory"),
    ("halves", None), ("interleaved", None)])
def test_caches_the_op_cannot_write(backend, case, match):
    k_cache, v_cache = unwritable_caches(case)
    k, v, slots = torch.ones(1, 2, 2, 8), -torch.ones(1, 2, 2, 8), torch.tensor([[1, 4]])
    if match is None:
        sarkernels.kv_cache_append(k_cache, v_cache, k, v, slots)
        assert k_cache[:, :, [1, 4]].eq(1).all() and v_cache[:, :, [1, 4]].eq(-1).all()
        return
    with pytest.raises(ValueError, match=match):
        sarkernels.kv_cache_append(k_cache, v_cache, k, v, slots)
    assert not k_cache.any() and not v_cache.any()


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       strides=st.lists(st.integers(0, 12), min_size=3, max_size=3),
       offsets=st.tuples(st.integers(0, 30), st.integers(0, 30)), same=st.booleans())
def test_overlap_is_never_missed_and_exact_for_one_layout(shape, strides, offsets, same):
    """Against the element offsets themselves: sharing one is always caught; two views of one
    layout without self-overlap that share none are let through (interleaved K and V)."""
    from sarkernels.ops import _overlap
    strides = strides[:len(shape)]
    flat = torch.zeros(200)
    a = flat.as_strided(shape, strides, offsets[0])
    b = flat.as_strided(shape if same else shape[::-1], strides if same else strides[::-1],
                        offsets[1])

    def elements(t):
        return {t.storage_offset() + sum(i * s for i, s in zip(idx, t.stride()))
                for idx in itertools.product(*map(range, t.shape))}

    shares = bool(elements(a) & elements(b))
    assert _overlap(a, b) or not shares
    # strides that nest: each beyond the reach of the smaller ones (a row-major layout's)
    dims = sorted((s, n) for n, s in zip(shape, strides) if n > 1)
    nested = all(s > sum((m - 1) * t for t, m in dims[:i]) for i, (s, _) in enumerate(dims))
    if same and nested:
        assert _overlap(a, b) == shares


def test_inference_caches_are_written_in_inference_mode(backend):
    with torch.inference_mode():
        k_cache, v_cache = torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8)
        sarkernels.kv_cache_append(k_cache, v_cache, torch.ones(1, 2, 1, 8),
                                   -torch.ones(1, 2, 1, 8), torch.tensor([[4]]))
    assert k_cache[:, :, 4].eq(1).all() and v_cache[:, :, 4].eq(-1).all()


@pytest.mark.parametrize("new", ["k", "v"])
@pytest.mark.parametrize("source", ["k_cache", "v_cache"])
def test_new_values_that_are_views_of_a_cache(backend, new, source):
    """A swap of two slots through views of the cache would read what it already overwrote."""
    caches = dict(k_cache=torch.arange(96.0).view(1, 2, 6, 8), v_cache=-torch.arange(96.0).view(1, 2, 6, 8))
    before = {name: t.clone() for name, t in caches.items()}
    values = dict(k=torch.ones(1, 2, 2, 8), v=torch.ones(1, 2, 2, 8))
    values[new] = caches[source][:, :, :2]
    with pytest.raises(ValueError, match=rf"{new} overlaps {source} in memory .*{new}\.clone\(\)"):
        sarkernels.kv_cache_append(**caches, **values, slots=torch.tensor([[1, 0]]))
    assert all(torch.equal(caches[name], before[name]) for name in caches)


SLOT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16,
               torch.uint32]


@pytest.mark.parametrize("dtype", SLOT_DTYPES, ids=str)
def test_every_integer_slot_dtype(backend, dtype):
    k_cache, v_cache = torch.zeros(2, 1, 6, 8), torch.zeros(2, 1, 6, 8)
    k = torch.arange(1.0, 5.0).view(2, 1, 2, 1).expand(2, 1, 2, 8)
    sarkernels.kv_cache_append(k_cache, v_cache, k, -k, torch.tensor([[5, 0], [1, 2]], dtype=dtype))
    assert k_cache[:, 0, :, 0].tolist() == [[2, 0, 0, 0, 0, 1], [0, 3, 4, 0, 0, 0]]
    assert torch.equal(v_cache, -k_cache)


def test_uint64_slots_are_refused(backend):
    k_cache, v_cache, k = torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8), torch.ones(1, 1, 1, 8)
    with pytest.raises(TypeError, match="kv_cache_append: slots must be an integer tensor of a "
                                        "dtype other than uint64.*got torch.uint64"):
        sarkernels.kv_cache_append(k_cache, v_cache, k, k, torch.tensor([[2]], dtype=torch.uint64))


def test_meta_tensors_propagate_shapes(backend):
    meta = dict(device="meta")
    k_cache, v_cache = torch.empty(2, 1, 6, 8, **meta), torch.empty(2, 1, 6, 8, **meta)
    k, slots = torch.empty(2, 1, 3, 8, **meta), torch.empty(2, 3, dtype=torch.long, **meta)
    if backend == "reference":
        assert sarkernels.kv_cache_append(k_cache, v_cache, k, k, slots) is None
    else:  # the compiled backends have no meta kernels, and say so
        with pytest.raises(RuntimeError, match="meta tensors"):
            sarkernels.kv_cache_append(k_cache, v_cache, k, k, slots)
    with pytest.raises(ValueError, match=r"slots must be \[B, n\] = \[2, 3\]"):
        sarkernels.kv_cache_append(k_cache, v_cache, k, k, slots[:, :2])


@pytest.mark.slow
def test_compiled_checks_like_eager(backend):
    """The checks that need values or memory run inside a compiled graph as eagerly."""
    def write(k_cache, v_cache, k, slots):
        sarkernels.kv_cache_append(k_cache, v_cache, k, -k, slots)
        return k_cache.sum()

    torch.compiler.reset()  # a compiled graph keeps the backend it was traced under
    compiled = torch.compile(write, fullgraph=True, backend="aot_eager")
    k = torch.ones(1, 2, 2, 8)
    buf = torch.zeros(2, 1, 2, 6, 8)
    cases = [(buf[0], buf[1], torch.tensor([[0, 9]]), r"slots\[0, 1\] = 9 is outside"),
             (buf[0], buf[1], torch.tensor([[2, 2]]), "slot 2 appears more than once"),
             (buf[0], buf[0], torch.tensor([[0, 1]]), "k_cache and v_cache overlap in memory")]
    for k_cache, v_cache, slots, match in cases:
        for fn in (write, compiled):
            with pytest.raises(ValueError, match=match):
                fn(k_cache, v_cache, k, slots)
            assert not buf.any()
    assert compiled(buf[0], buf[1], k, torch.tensor([[4, 1]])) == 32
    assert buf[0][:, :, [4, 1]].eq(1).all() and buf[1][:, :, [4, 1]].eq(-1).all()


BAD = [
    (lambda a: dict(k=a["k"].double(), v=a["v"].double()), "k must have dtype torch.float32"),
    (lambda a: dict(k=a["k"][:, :1], v=a["v"][:, :1]), r"k must be \[B=2, H=2, n, D=8\]"),
    (lambda a: dict(v=a["v"][:, :, :1]), "v must be"),
    (lambda a: dict(v_cache=a["v_cache"][:, :, :3]), "v_cache .* must match k_cache"),
    (lambda a: dict(slots=a["slots"].float()), "slots must be an integer"),
    (lambda a: dict(slots=a["slots"][:, :1]), r"slots must be \[B, n\]"),
    (lambda a: dict(k_cache=a["k_cache"][0]), "k_cache must be 4-D"),
    (lambda a: dict(k_cache=a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
     "unit stride"),
    (lambda a: dict(slots=a["slots"].to("meta")), "slots is on meta"),
]


@pytest.mark.parametrize("change,match", BAD)
def test_bad_input_names_the_argument(change, match):
    args = dict(k_cache=torch.zeros(2, 2, 6, 8), v_cache=torch.zeros(2, 2, 6, 8),
                k=torch.ones(2, 2, 3, 8), v=torch.ones(2, 2, 3, 8),
                slots=torch.tensor([[0, 1, 2], [3, 4, 5]]))
    args.update(change(args))
    with pytest.raises((ValueError, TypeError), match=match):
        sarkernels.kv_cache_append(**args)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_opcheck(ns):
    k_cache, v_cache = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16)
    k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4, 16)
    slots = torch.tensor([[0, 9, 3, 4], [5, 6, 7, 1]])
    for check in (True, False):
        torch.library.opcheck(getattr(torch.ops, ns).kv_cache_append.default,
                              (k_cache, v_cache, k, v, slots, check))


def test_opcheck_of_the_checks():
    k_cache, v_cache = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16)
    k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4, 16)
    slots = torch.tensor([[0, 9, 3, 4], [5, 6, 7, 1]])
    for check_slots in (True, False):
        torch.library.opcheck(torch.ops.sarkernels.kv_cache_append_checks.default,
                              (k_cache, v_cache, k, v, slots, check_slots))
