"""Training is bit-reproducible whatever the thread count and whatever ran before it in the
process: exact resume (test_cli.py) is only as good as this."""
import json
import os
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
