"""Training is bit-reproducible whatever the thread count and whatever ran before it in the
process: exact resume (test_cli.py) is only as good as this."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sarkernels.app import checkpoint
from sarkernels.app.train import TrainConfig, train

TINY = dict(dim=32, heads=2, layers=1, batch=8, warmup=2, steps=6, ckpt_every=6, dropout=0.0)
MODELS = ["sar", "randar", "rar"]


def trained(out, model, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train(TrainConfig(model=model, out=str(out), **TINY), progress=False)
    finally:
        torch.set_num_threads(before)
    return load_file(os.path.join(checkpoint.resolve(str(out)), "model.safetensors"))


def assert_same_bits(a, b, what):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("model", MODELS)
def test_thread_count_does_not_change_the_bits(tmp_path, model):
    one = trained(tmp_path / "one", model, 1)
    two = trained(tmp_path / "two", model, 2)
    assert_same_bits(one, two, "1 vs 2 threads")


def test_a_fresh_process_trains_the_same_bits(tmp_path):
    """The first training of a process (lazy initialisation of thread pools and BLAS on its
    first calls, at whatever timing the machine gives) equals a later one here."""
    script = ("import json, sys\nfrom sarkernels.app.train import TrainConfig, train\n"
              "for model in sys.argv[2:]:\n"
              "    train(TrainConfig(model=model, out=f'{sys.argv[1]}/{model}', "
              f"**json.loads({json.dumps(json.dumps(TINY))})), progress=False)\n")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "fresh"), *MODELS],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    for model in MODELS:
        here = trained(tmp_path / "here" / model, model, torch.get_num_threads())
        fresh = load_file(os.path.join(checkpoint.resolve(str(tmp_path / "fresh" / model)),
                                       "model.safetensors"))
        assert_same_bits(here, fresh, f"{model}: this process vs a fresh one")


# One attention forward + backward on the CPU kernels, after malloc'ing the given byte counts
# (and keeping them): that moves where the heap's next blocks start.
_BLAS_CALLS = """
import ctypes, sys, torch, sarkernels
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
held = [libc.malloc(int(n)) for n in sys.argv[1:]]
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 2, 50, 16, generator=g, requires_grad=True) for _ in range(3))
sets = torch.randint(0, 7, (2, 50), generator=g).sort(-1).values
sarkernels.set_attention(q, k, v, sets, sets).sum().backward()
"""


def blas_operands(*heap_shifts):
    """(call, shapes, A/B/C address mod 64) of every SGEMM the kernels make, from MKL's log."""
    env = {**os.environ, "MKL_VERBOSE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _BLAS_CALLS, *map(str, heap_shifts)],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    calls = []
    for args in re.findall(r"MKL_VERBOSE SGEMM\(([^)]*)\)", res.stdout):
        # transa, transb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc
        a = args.split(",")
        calls.append((*a[:5], a[7], a[9], a[12], *(int(a[i], 16) % 64 for i in (6, 8, 11))))
    return calls


def test_blas_sees_the_same_alignment_whatever_the_heap():
    """MKL may order a product's sums by its operands' alignment (Intel's "Aligning Data for
    Consistent Results"), so the kernels' BLAS operands must be aligned alike in every run:
    scratch in malloc'd memory (16-byte aligned, anywhere mod 64) let the heap's history,
    not the inputs, decide where sums could round differently."""
    calls = blas_operands()
    if not calls:
        pytest.skip("torch's BLAS here is not MKL (no MKL_VERBOSE log)")
    for shifts in ([16], [32], [48, 1000]):
        assert blas_operands(*shifts) == calls, f"heap moved by malloc({shifts})"
