import contextlib

import pytest
import torch
from hypothesis import HealthCheck, settings

import sarkernels
from sarkernels import ops, reference

# The backend fixture only selects a backend for the whole test: safe to share across examples.
_shared = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_shared)
settings.register_profile("dev", max_examples=15, **_shared)
settings.load_profile("ci")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_KERNELS = ops.backends()["cpu"]["usable"]
HAS_SIMT = ops.backends()["simt"]["usable"]
# Every test that takes `backend` runs on the compiled CPU kernels, the CUDA kernels under
# the SIMT executor (where built) and the reference.
BACKENDS = ["kernels"] * HAS_KERNELS + ["simt"] * HAS_SIMT + ["reference"]
# Op namespaces for opcheck: the compiled CPU kernels and the SIMT-run CUDA kernels.
NAMESPACES = ["sarkernels"] * HAS_KERNELS + ["sarkernels_simt"] * HAS_SIMT


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with sarkernels.use_backend(request.param):
        yield request.param


@contextlib.contextmanager
def simt_options(schedule="forward", seed=0, threads=1):
    """The SIMT executor's schedule and thread pool within the block."""
    from sarkernels import _simt
    previous = _simt.options()
    _simt.set_options(schedule, seed, threads)
    try:
        yield
    finally:
        _simt.set_options(**previous)


def bits(t):
    """A view that compares equal only for identical bits (NaNs included)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def set_ids(pattern, batch, length, gen, num_sets=5):
    """Set ids of one of the patterns the op must handle."""
    if pattern == "arange":
        return torch.arange(length).expand(batch, length).clone()
    if pattern == "equal":
        return torch.zeros(batch, length, dtype=torch.long)
    ids = torch.randint(0, num_sets, (batch, length), generator=gen)
    return ids.sort(-1).values if pattern == "sorted" else ids


def attention_inputs(b, hq, hkv, lq, lk, d, gen, dtype=torch.float64, layout="contiguous"):
    """Fresh random q, k, v; layout "blhd" gives the [B, L, H, D]-transposed strides."""
    def make(h, length):
        if layout == "blhd":
            return torch.randn(b, length, h, d, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)
        return torch.randn(b, h, length, d, generator=gen, dtype=torch.float64).to(dtype)
    return make(hq, lq), make(hkv, lk), make(hkv, lk)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# Smallest tolerance a low-precision result is held to: a few units in the last place.
ERR_FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def assert_within(ours, baseline, exact, dtype, what):
    """Our error against the float64 result is at most 2x PyTorch's own same-precision
    error (plus a floor of a few ulps)."""
    e_ours, e_base = max_err(ours, exact), max_err(baseline, exact)
    assert e_ours <= 2 * e_base + ERR_FLOOR[dtype], (
        f"{what}: error {e_ours:.3g} vs PyTorch same-precision {e_base:.3g} ({dtype})")


def non_finite_reach(q, k, v, q_sets, k_sets, strict):
    """Where set_attention's rule lets a NaN/inf input show, forward and backward: the rows
    whose q is not finite and that see a key, or that see a key whose k or v is not finite;
    then the keys those rows see. Returns (rows [B, Hq, Lq], keys [B, Hkv, Lk], and the rows
    that see no key [B, Hq, Lq])."""
    sees = reference.visible(q_sets.long(), k_sets.long(), strict)  # [B, Lq, Lk]
    group = q.shape[1] // k.shape[1]
    bad_q = ~q.isfinite().all(-1)
    bad_kv = (~k.isfinite().all(-1) | ~v.isfinite().all(-1)).repeat_interleave(group, 1)
    rows = (bad_q & sees.any(-1)[:, None]) | (sees[:, None] & bad_kv[:, :, None]).any(-1)
    keys = (rows[..., None] & sees[:, None]).unflatten(1, (-1, group)).any(2).any(2)
    return rows, keys, ~sees.any(-1)[:, None].expand_as(rows)
