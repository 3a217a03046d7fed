"""Careless use of the command line: each mistake is one ``sarkernels: error:`` line and exit
status 2, found before any work. The cases run ``main()`` in this process (the same code
``python -m sarkernels`` runs, without a second of interpreter start each);
test_cli.py runs the real ``python -m sarkernels`` for the flows and a few of these."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import sarkernels.app.demo
import sarkernels.app.train
import sarkernels.tokenizers
from sarkernels.app import checkpoint
from sarkernels.__main__ import main
from sarkernels.app.train import TrainConfig, train

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


@pytest.fixture
def no_work(monkeypatch):
    """Training, the demo's training and VQ loading fail the test if a mistake reaches them."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the mistake was found")
    monkeypatch.setattr(sarkernels.app.train, "build_model", work)
    monkeypatch.setattr(sarkernels.app.demo, "train", work)
    monkeypatch.setattr(sarkernels.tokenizers.VQTokenizer, "from_checkpoint", work)


def test_mistakes_are_one_line_before_any_work(tmp_path, capsys, run, no_work):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    images = tmp_path / "images" / "cats"
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "0.png")
    ro = unwritable(tmp_path)
    no_cuda = [] if torch.cuda.is_available() else [
        (["train", *TINY, "--device", "cuda", "--out", tmp_path / "c"], "CUDA is not available"),
        (["tokenize", "--images", tmp_path / "images", "--vq", "vq.pt", "--out", tmp_path / "t",
          "--device", "cuda"], "CUDA is not available")]
    train_ = ["train", *TINY, "--out", tmp_path / "fresh"]
    sample = ["sample", "--ckpt", run]
    tokenize = ["tokenize", "--images", tmp_path / "images", "--vq", "vq.pt"]
    cases = no_cuda + [
        (train_ + ["--batch", "0"], "--batch must be >= 1, got 0"),
        (train_ + ["--ckpt-every", "0"], "--ckpt-every must be >= 1, got 0"),
        (train_ + ["--ckpt-every", "-1"], "--ckpt-every must be >= 1, got -1"),
        (train_ + ["--steps", "0"], "--steps must be >= 1, got 0"),
        (train_ + ["--steps", "-5"], "--steps must be >= 1, got -5"),
        (train_ + ["--layers", "0"], "--layers must be >= 1, got 0"),
        (train_ + ["--class-dropout", "2"], "--class-dropout is a probability in [0, 1), got 2.0"),
        (train_ + ["--lr", "0"], "--lr must be > 0"),
        (train_ + ["--dim", "48", "--heads", "4"], "head dim D must be a multiple of 8"),
        (train_ + ["--dim", "30", "--heads", "4"], "--dim 30 must split evenly into --heads 4"),
        (train_ + ["--device", "tpu"], "--device 'tpu' is not a device"),
        (train_ + ["--model", "gpt"], "argument --model: invalid choice"),
        (train_ + ["--steps", "ten"], "argument --steps: invalid int value"),
        (["train", *TINY, "--out", ro / "run"], "--out"),
        (["train", *TINY, "--out", a_file], "is a file; give a folder"),
        (["train", "--out", tmp_path / "none", "--resume"], "does not exist"),
        (["train", "--out", run, "--resume", "--overwrite"], "pass one"),
        (sample + ["--labels", ""], "--labels is empty"),
        (sample + ["--labels", "1,2,"], "--labels '1,2,' has an empty item"),
        (sample + ["--labels", "3,12"], "--labels must be in [0, 10)"),
        (sample + ["--mask", "top"], "pass --image too"),
        (sample + ["--image", images / "0.png", "--mask", "middle"], "'middle' is neither"),
        (sample + ["--image", tmp_path / "none.png"], "(--image): no such file"),
        (sample + ["--out", tmp_path], "is a folder; give a file name such as"),
        (sample + ["--out", tmp_path / "grid.foo"], "picture extension"),
        (sample + ["--out", ro / "grid.png"], "cannot write there"),
        (sample + ["--cfg", "-1"], "cfg_scale must be >= 0"),
        (sample + ["--n", "0"], "argument --n: must be an integer >= 1"),
        (sample + ["--device", "tpu"], "--device 'tpu' is not a device"),
        (tokenize + ["--out", a_file], "is a file; give a folder"),
        (tokenize + ["--out", ro / "tokens"], "--out"),
        (tokenize + ["--out", tmp_path / "t", "--batch", "0"], "argument --batch: must be an integer >= 1"),
        (["tokenize", "--images", tmp_path / "none", "--vq", "vq.pt", "--out", tmp_path / "t"],
         "is not a folder"),
        (["demo", "--cfg", "-1", "--out", tmp_path / "demo"], "cfg_scale must be >= 0"),
        (["demo", "--out", a_file], "is a file; give a folder"),
        (["demo", "--out", ro / "demo"], "--out"),
        (["demo", "--device", "tpu", "--out", tmp_path / "demo"], "is not a device"),
        (["digit", "--label", "11"], "--label is a digit 0 to 9"),
        (["digit", "--label", "3", "--index", "999", "--out", tmp_path / "d.png"], "--index must be in"),
        (["digit", "--label", "3", "--out", tmp_path], "is a folder"),
        (["fly"], "invalid choice: 'fly'"),
    ]
    for args, message in cases:
        one_line_error(capsys, args, message)
    assert not any((tmp_path / name).exists() for name in ("fresh", "c", "t", "demo"))


def test_run_folder_is_never_overwritten_or_reconfigured_silently(tmp_path, capsys, run):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for args, message in [
        (["train", "--model", "randar", *TINY, "--out", out], "already holds a run"),
        (["train", "--model", "sar", *TINY, "--out", out], "pass --resume to continue it or --overwrite"),
        (["train", "--out", out, "--resume", "--lr", "0.1", "--batch", "16"],
         "may change only --steps, --ckpt-every, --device, not --batch 16 (the run has 8); "
         "--lr 0.1 (the run has 0.002)"),
        (["train", "--out", out, "--resume", "--model", "sar"], "--model 'sar' (the run has 'randar')"),
        (["train", "--out", out, "--resume", "--dim", "64"], "--dim 64 (the run has 32)"),
        (["train", "--out", out, "--resume", "--steps", "5"], "is at step 6, so --steps 5 leaves nothing"),
        (["train", "--out", out, "--resume"], "--steps 6 leaves nothing to train"),
    ]:
        one_line_error(capsys, args, message)
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # the README's resume line names no --model: the run's own settings are used
    assert main(["train", "--out", str(out), "--resume", "--steps", "8", "--no-progress"]) == 0
    config = checkpoint.read_config(checkpoint.resolve(str(out)))
    assert config["model"] == "randar" and config["step"] == 8 and config["train"]["steps"] == 8
    assert main(["train", "--model", "sar", *TINY, "--steps", "2", "--out", str(out),
                 "--overwrite"]) == 0
    assert checkpoint.step_folders(str(out)) == ["step-000002"]
    assert checkpoint.read_config(checkpoint.resolve(str(out)))["model"] == "sar"


def test_checkpoint_mistakes_have_helpful_messages(tmp_path, capsys, run):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    os.remove(out / "latest")  # the newest complete step folder stands in for it
    assert main(["sample", "--ckpt", str(out), "--labels", "1", "--out", str(tmp_path / "a.png")]) == 0
    assert "from " + str(out / "step-000006") in capsys.readouterr().out
    weights = out / "step-000006" / "model.safetensors"
    assert main(["sample", "--ckpt", str(weights), "--labels", "1", "--out", str(tmp_path / "b.png")]) == 0
    capsys.readouterr()
    (out / "step-000006" / "train_state.pt").write_bytes(b"garbage")
    one_line_error(capsys, ["train", "--out", out, "--resume", "--steps", "9"],
                   "train_state.pt is corrupt or not written by sarkernels")
    train(TrainConfig(model="sar", steps=1, out=str(tmp_path / "sar"), dim=32, heads=2, layers=1,
                      batch=8), progress=False)
    shutil.copy(tmp_path / "sar" / "step-000001" / "model.safetensors", weights)
    rc = main(["sample", "--ckpt", str(out), "--out", str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err) < 400 and "weights do not match its config: 8 missing (e.g." in err
    shutil.rmtree(out / "step-000005")
    os.remove(out / "step-000006" / "config.json")
    one_line_error(capsys, ["sample", "--ckpt", out], "no model.safetensors and config.json in it "
                                                     "or in a step-N folder")


def test_an_error_while_training_is_printed_below_the_progress_bar(tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save", disk_full)
    args = [a for a in TINY if a != "--no-progress"]
    assert main(["train", *args, "--steps", "3", "--ckpt-every", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train sar" in err and err.endswith("\nsarkernels: error: [Errno 28] No space left on device\n")


def test_ctrl_c_after_a_checkpoint_names_it(tmp_path, capsys, monkeypatch):
    save = checkpoint.save

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save", save_then_interrupt)
    assert main(["train", *TINY, "--steps", "4", "--ckpt-every", "2", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == (
        f"sarkernels: interrupted; the newest checkpoint is {tmp_path / 'step-000002'}: continue "
        f"with python -m sarkernels train --out {tmp_path} --resume\n")

