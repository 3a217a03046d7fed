"""What the command-line tests share: a tiny training setup, a finished run, a guard that
no work starts, and the check that a mistake is one ``sarkernels: error:`` line. The
checks run ``main()`` in this process (the same code ``python -m sarkernels`` runs,
without a second of interpreter start each)."""
import os
from pathlib import Path

import pytest

import sarkernels.app.demo
import sarkernels.app.train
import sarkernels.tokenizers
from sarkernels.__main__ import main
from sarkernels.app.train import TrainConfig, train
from sarkernels.models import MODELS
from sarkernels.models.randar import RandARTransformer

TINY = ["--dim", "32", "--heads", "2", "--layers", "1", "--batch", "8", "--warmup", "2",
        "--no-progress"]


def unwritable(tmp_path):
    """A folder this process cannot write into (root writes through permission bits, but
    not into sysfs)."""
    if os.geteuid() == 0:
        return Path("/sys")
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    return path


def one_line_error(capsys, args, message):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 2, (args, out, err)
    assert err.startswith("sarkernels: error:") and err.count("\n") == 1, (args, err)
    assert message in err and out == "", (args, err)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished randar run: checkpoints at steps 5 and 6."""
    out = str(tmp_path_factory.mktemp("run") / "randar")
    train(TrainConfig(model="randar", steps=6, ckpt_every=5, out=out, dim=32, heads=2, layers=1,
                      batch=8, warmup=2), progress=False)
    return out


@pytest.fixture(scope="module")
def sar(tmp_path_factory):
    """A tiny digits SAR run, trained for 3 steps."""
    out = str(tmp_path_factory.mktemp("sar") / "sar")
    train(TrainConfig(model="sar", steps=3, out=out, dim=32, heads=2, layers=1, batch=8,
                      warmup=2), progress=False)
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Training, the demo's training, sampling and VQ loading fail the test if a mistake
    reaches them."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the mistake was found")
    monkeypatch.setattr(sarkernels.app.train, "build_model", work)
    monkeypatch.setattr(sarkernels.app.demo, "train", work)
    monkeypatch.setattr(sarkernels.tokenizers.VQTokenizer, "from_checkpoint", work)
    monkeypatch.setattr(sarkernels.tokenizers, "load_vq", work)
    for model in MODELS.values():
        monkeypatch.setattr(model, "generate", work)
    monkeypatch.setattr(RandARTransformer, "generate_extrapolated", work)
