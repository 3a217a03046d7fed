"""The SIMT executor (csrc/simt/) and the emulated warp primitives, through the self-test
kernels of sarkernels._simt: mma.sync and ldmatrix against the PTX ISA's fragment tables,
a warp GEMM against torch.matmul, identical bits under every schedule, and planted bugs
(missing or divergent barriers, partial collectives, misaligned or out-of-bounds accesses)
that must be reported, never hang.

The whole module also runs under AddressSanitizer (`make simt-asan`, marker `asan`)."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import simt_options as options

simt = pytest.importorskip("sarkernels._simt", reason="built only with SARKERNELS_SIMT=1")
pytestmark = pytest.mark.asan
# `make simt-asan` sets SARKERNELS_SIMT=asan: there the ASan tests must run (and fail if the
# module loaded is not the ASan build); elsewhere they need that build.
needs_asan = pytest.mark.skipif(
    not simt.build_info["asan"] and os.environ.get("SARKERNELS_SIMT") != "asan",
    reason="needs the AddressSanitizer build of _simt (make simt-asan)")

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]
HALF_TYPES = [torch.bfloat16, torch.float16]


def under_every_schedule(fn):
    results = []
    for schedule, seed in SCHEDULES:
        with options(schedule, seed):
            results.append(fn())
    return results


def bits(t):
    """The tensor's bits, so that equality also holds for identical NaNs."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def to_int32(values):
    """Unsigned 32-bit register values as the int32 tensor holding the same bits."""
    v = torch.as_tensor(values, dtype=torch.int64)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


# ---------------------------------------------------------------- PTX ISA fragment tables
# PTX ISA 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type", .f16 and
# .bf16 multiplicands, .f32 accumulators. A register holds two consecutive elements, the
# lower-indexed one in its low 16 bits ("Elements (low to high)").

def mma_a_coords(lane, i):
    """(row, col) of a_i, i = 0..7, in the 16x16 A fragment of `lane`."""
    group, tig = lane >> 2, lane % 4
    row = group if i < 2 or 4 <= i < 6 else group + 8
    col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def mma_b_coords(lane, i):
    """(row, col) of b_i, i = 0..3, in the 16x8 B fragment of `lane`."""
    group, tig = lane >> 2, lane % 4
    return tig * 2 + (i & 1) + (8 if i >= 2 else 0), group


def mma_c_coords(lane, i):
    """(row, col) of c_i / d_i, i = 0..3, in the 16x8 accumulator fragment of `lane`."""
    group, tig = lane >> 2, lane % 4
    return (group if i < 2 else group + 8), tig * 2 + (i & 1)


def pack_fragments(mat, coords, registers):
    """[32, registers] int32: register r of lane l holds elements 2r (low) and 2r+1 (high)."""
    b16 = mat.view(torch.int16).to(torch.int64) & 0xFFFF
    return to_int32([[b16[coords(lane, 2 * r)].item() | b16[coords(lane, 2 * r + 1)].item() << 16
                      for r in range(registers)] for lane in range(32)])


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_mma_fragments_follow_the_ptx_tables(dtype):
    gen = torch.Generator().manual_seed(1)
    # small integers: every product and sum is exact, so the check is bitwise
    A = torch.randint(-8, 9, (16, 16), generator=gen).to(dtype)
    B = torch.randint(-8, 9, (16, 8), generator=gen).to(dtype)
    C = torch.randint(-99, 100, (16, 8), generator=gen).float()
    c = torch.tensor([[C[mma_c_coords(lane, i)].item() for i in range(4)] for lane in range(32)])
    d = simt.mma_fragments(pack_fragments(A, mma_a_coords, 4), pack_fragments(B, mma_b_coords, 2),
                           c, dtype)
    D = torch.matmul(A.double(), B.double()) + C.double()
    expected = torch.tensor([[D[mma_c_coords(lane, i)].item() for i in range(4)] for lane in range(32)])
    assert torch.equal(d, expected.float())


# PTX ISA 9.7.14.5.15 "ldmatrix": lanes 8j..8j+7 give the row addresses of matrix j (x1 uses
# lanes 0-7, x2 lanes 0-15); lane l receives in register j the elements of row l / 4 at
# columns 2 (l % 4) and 2 (l % 4) + 1 of matrix j, of its transpose with .trans.

def ldmatrix_expected(mats, trans):
    regs = []
    for lane in range(32):
        row, col = lane // 4, 2 * (lane % 4)
        regs.append([(m.T if trans else m)[row, col].item() | (m.T if trans else m)[row, col + 1].item() << 16
                     for m in mats])
    return to_int32(regs)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_follows_the_ptx_table(n, trans):
    gen = torch.Generator().manual_seed(10 * n + trans)
    mats = torch.randint(0, 2**15, (n, 8, 8), generator=gen)
    slots = 8 * n + 5  # rows sit at shuffled places among unused ones
    place = torch.randperm(slots, generator=gen)
    rows = torch.randint(0, 2**15, (slots, 8), generator=gen)
    rows[place[:8 * n]] = mats.reshape(8 * n, 8)
    # lanes past 8n address rows the instruction does not read
    lane_rows = torch.cat([place[:8 * n], torch.randint(0, slots, (32 - 8 * n,), generator=gen)])
    got = simt.ldmatrix(rows.to(torch.int16), lane_rows.to(torch.int32), n, trans)
    assert torch.equal(got, ldmatrix_expected(mats, trans))


# ---------------------------------------------------------------- tensor-core GEMMs

def fp32_accumulation_bound(a, b):
    """Elementwise bound on |a @ b - exact| for float32 sums of exact products over K."""
    return a.shape[1] * 2.0**-23 * torch.matmul(a.double().abs(), b.double().abs())


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_warp_mma_tile_matches_matmul(dtype):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 8, generator=gen).to(dtype)
    err = (simt.warp_mma(a, b).double() - torch.matmul(a.double(), b.double())).abs()
    assert (err <= fp32_accumulation_bound(a, b)).all()


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("mnk", [(64, 64, 64), (128, 64, 96)])
def test_warp_gemm_matches_matmul(dtype, mnk):
    m, n, k = mnk
    gen = torch.Generator().manual_seed(m + n + k)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    err = (simt.warp_gemm(a, b).double() - torch.matmul(a.double(), b.double())).abs()
    assert (err <= fp32_accumulation_bound(a, b)).all()


# ---------------------------------------------------------------- warp primitives

def test_shuffles_and_votes():
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-200, 201, (128,), generator=gen, dtype=torch.int32)
    got = simt.warp_votes(x)
    lanes = torch.arange(32)
    for w in range(4):
        v = x[32 * w:32 * w + 32]
        ballot = sum(1 << i for i in range(32) if v[i] > 0)
        expected = torch.stack([
            v[(7 * lanes + 3) % 32], v[lanes ^ 5], to_int32([ballot] * 32),
            torch.full((32,), int((v > 100).any())), torch.full((32,), int((v > -100).all())),
            torch.full((32,), int(v.sum())), v[lanes ^ 3]], dim=1).to(torch.int32)
        assert torch.equal(got[32 * w:32 * w + 32], expected), f"warp {w}"


def test_partial_warp_collectives():
    x = torch.arange(48, dtype=torch.int32) % 3 - 1  # -1, 0, 1, ...
    got = simt.tail_ballot(x, 0x0000FFFF)  # the last warp has 16 lanes
    expected = [sum(1 << i for i in range(32) if x[i] > 0)] * 32 + [sum(1 << i for i in range(16) if x[32 + i] > 0)] * 16
    assert torch.equal(got, to_int32(expected))
    with pytest.raises(RuntimeError, match=r"tail_ballot.*ballot at \S+:\d+ \(mask 0xffffffff\): the mask names lanes 16-31, which do not exist"):
        simt.tail_ballot(x, 0xFFFFFFFF)
    with pytest.raises(RuntimeError, match=r"tail_ballot.*the mask leaves out the calling lane 1\b"):
        simt.tail_ballot(x[:32].clone(), 0x1)


@pytest.mark.parametrize("threads", [1, 2])
def test_atomics(threads):
    with options(threads=threads):
        assert simt.atomic_count(64, 96) == 64 * 96


def test_cp_async_lands_at_wait_group():
    gen = torch.Generator().manual_seed(4)
    src = torch.randn(4, 32, 4, generator=gen)
    got = simt.cp_async_groups(src)  # [snapshot, lane, slot, 4]
    # groups {0, 4 (zero-filled)}, {1}, {2} committed and slot 3 issued before snapshot 0;
    # then wait_group 2, 1, 0 (slot 3, uncommitted, stays in flight), commit + wait 0
    landed = [set(), {0, 4}, {0, 1, 4}, {0, 1, 2, 4}, {0, 1, 2, 3, 4}]
    for i, slots in enumerate(landed):
        for k in range(5):
            s = got[i, :, k]
            if k not in slots:
                assert s.isnan().all(), f"snapshot {i}: slot {k} visible before its wait"
            else:
                assert torch.equal(s, torch.zeros(32, 4) if k == 4 else src[k]), f"snapshot {i}, slot {k}"


def test_shared_memory_starts_as_nan_bytes():
    got = simt.read_unwritten_shared(100)
    assert (got == 0xFF).all()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert got[:96].view(dtype).isnan().all()


# ---------------------------------------------------------------- schedules

def correct_kernels():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(128, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(64, 128, generator=gen).to(torch.bfloat16)
    x = torch.randint(-200, 201, (128,), generator=gen, dtype=torch.int32)
    src = torch.randn(4, 32, 4, generator=gen)
    f = torch.randn(96, generator=gen)
    return {
        "warp_gemm": lambda: simt.warp_gemm(a, b),
        "warp_mma": lambda: simt.warp_mma(a[:16, :16].contiguous(), b[:16, :8].contiguous()),
        "warp_votes": lambda: simt.warp_votes(x),
        "cp_async_groups": lambda: simt.cp_async_groups(src),
        "shared_exchange": lambda: simt.shared_exchange(f, barrier=True),
    }


@pytest.mark.parametrize("name", sorted(correct_kernels()))
def test_same_bits_under_every_schedule(name):
    results = under_every_schedule(correct_kernels()[name])
    for (schedule, seed), r in zip(SCHEDULES[1:], results[1:]):
        assert torch.equal(bits(r), bits(results[0])), f"{name}: {schedule} (seed {seed}) differs"


def test_thread_pool_gives_the_same_bits():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(128, 64, generator=gen).to(torch.float16)
    b = torch.randn(64, 192, generator=gen).to(torch.float16)  # 6 blocks
    with options(threads=1):
        one = simt.warp_gemm(a, b)
    with options("random", 7, threads=2):
        two = simt.warp_gemm(a, b)
    assert torch.equal(one, two)


def test_missing_barrier_is_caught():
    x = torch.randn(64, generator=torch.Generator().manual_seed(7))
    for r in under_every_schedule(lambda: simt.shared_exchange(x, barrier=True)):
        assert torch.equal(r, x.roll(32))
    with options("forward"):
        forward = simt.shared_exchange(x, barrier=False)
    with options("reverse"):
        reverse = simt.shared_exchange(x, barrier=False)
    # each schedule reads the other warp's half before it is written: NaN poison, and the
    # two schedules disagree
    assert forward.isnan().any() and reverse.isnan().any()
    assert not torch.equal(bits(forward), bits(reverse))
    # a random schedule is another order, and the same one for the same seed
    with options("random", 5):
        random = simt.shared_exchange(x, barrier=False)
    with options("random", 5):
        assert torch.equal(bits(simt.shared_exchange(x, barrier=False)), bits(random))
    assert random.isnan().any() and not random.isnan().all()
    assert not torch.equal(bits(random), bits(forward)) and not torch.equal(bits(random), bits(reverse))


# ---------------------------------------------------------------- planted bugs

PLANTED = {
    "divergent_barrier": (simt.divergent_barrier, r"divergent __syncthreads: \S+selftest_kernels.cuh:\d+ and \S+selftest_kernels.cuh:\d+"),
    "partial_shuffle (others exit)": (lambda: simt.partial_shuffle(False), r"exited"),
    "partial_shuffle (others at a barrier)": (lambda: simt.partial_shuffle(True), r"deadlock"),
    "mixed_collectives": (simt.mixed_collectives, r"disagree: lanes .* wait in (shfl|ballot)"),
    "misaligned16": (simt.misaligned16, r"load16: address \S+ is not 16-byte aligned"),
    "ldmatrix_from_global": (simt.ldmatrix_from_global, r"ldmatrix row address: .* outside"),
}


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_is_reported(bug, schedule):
    call, message = PLANTED[bug]
    kernel = bug.split()[0]
    with options(schedule, 11), pytest.raises(simt.SimtError, match=rf"kernel selftest::{kernel}, block \(0,0,0\).*{message}"):
        call()
    # the failed block's fibers are abandoned and reused: the next launch runs normally
    x = torch.randn(64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(simt.shared_exchange(x, barrier=True), x.roll(32))


def test_deadlock_report_names_every_waiter():
    with pytest.raises(RuntimeError) as info:
        simt.partial_shuffle(True)
    msg = str(info.value)
    assert "threads 16-31 wait at __syncthreads (" in msg and "selftest_kernels.cuh:" in msg
    assert re.search(r"warp 0 lanes 0-15 wait in shfl at \S+selftest_kernels.cuh:\d+ \(mask 0xffffffff\) "
                     r"for lanes 16-31", msg), msg


def test_primitives_outside_a_kernel_raise():
    with pytest.raises(RuntimeError, match="used outside a kernel"):
        simt.lane_id_outside_kernel()


def test_errors_stop_the_thread_pool_too():
    with options(threads=2), pytest.raises(RuntimeError, match="divergent __syncthreads"):
        simt.divergent_barrier()


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="schedule"):
        simt.set_options("sideways")
    with pytest.raises(RuntimeError, match="threads must be >= 1"):
        simt.set_options("forward", 0, 0)
    assert simt.options() == {"schedule": "forward", "seed": 0, "threads": 1}


# ---------------------------------------------------------------- AddressSanitizer
# ASan aborts the process at the first error: each planted access runs in a subprocess with
# this process's environment (LD_PRELOAD of libasan) and package, away from the working
# directory (which may hold another build of the package).

def run_planted(code, tmp_path):
    package_root = os.path.dirname(os.path.dirname(simt.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", "import torch, sarkernels._simt as s; " + code],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@needs_asan
def test_asan_reports_an_out_of_bounds_global_write(tmp_path):
    r = run_planted("s.oob_write(torch.zeros(10))", tmp_path)
    assert r.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in r.stderr, r.stderr[-3000:]


@needs_asan
def test_asan_reports_a_shared_memory_overflow(tmp_path):
    r = run_planted("s.shared_overflow()", tmp_path)
    assert r.returncode != 0 and "AddressSanitizer: use-after-poison" in r.stderr, r.stderr[-3000:]


def test_stack_overflow_faults_in_the_guard_region(tmp_path):
    r = run_planted("s.stack_overflow()", tmp_path)
    if simt.build_info["asan"]:
        assert "AddressSanitizer: stack-overflow" in r.stderr, r.stderr[-3000:]
    else:
        assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stderr[-3000:])
