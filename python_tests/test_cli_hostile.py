"""Hostile and careless command lines: each is refused with exit status 2 and exactly one
``sarkernels: error:`` line naming the option, what it expects and what it got (so no
traceback), before any work and without writing anything. Then what the run folder
survives: a full disk, a second run, a diverging loss, SIGTERM, links out of the run."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import torch
from PIL import Image

from cli_harness import TINY, no_work, one_line_error, run, unwritable  # noqa: F401 (fixtures)
from sarkernels.__main__ import main
from sarkernels.app import checkpoint, data, train
from sarkernels.tokenizers import DigitsTokenizer


def tree(*roots):
    """Every path under ``roots`` with its bytes (a folder's: None)."""
    return {p: p.read_bytes() if p.is_file() else None
            for root in roots for p in sorted(Path(root).rglob("*"))}


def token_folder(path, tokens, labels, num_classes):
    """A token folder of digit tokens, one part, as tokenize writes it."""
    path.mkdir()
    meta = {"num_classes": num_classes, "images": len(labels), "batch": len(labels),
            "tokenizer": DigitsTokenizer(8).config()}
    data.start_token_folder(str(path), meta)
    data.write_part(data.part_path(str(path), 0), tokens, labels, [])
    return path


def edited(run, path, change):
    """A copy of the run's newest step folder with ``change(config)`` in its config.json."""
    shutil.copytree(checkpoint.resolve(run), path)
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_hostile_invocations_are_one_line_before_any_work(tmp_path, capsys, run, no_work):
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
    digits = data.digits(8)
    tokens, labels = digits.tokens[:4], digits.labels[:4] % 2
    assert len(data.load_token_folder(str(token_folder(tmp_path / "ok", tokens, labels, 2)))) == 4
    beyond = tokens.clone()
    beyond[2, 5] = digits.tokenizer.vocab_size
    beyond = token_folder(tmp_path / "beyond", beyond, labels, 2)
    one_class = token_folder(tmp_path / "one_class", tokens, labels, 1)  # labels 0 and 1
    negative = edited(run, tmp_path / "negative", lambda c: c["model_config"].update(dim=-32))
    huge = edited(run, tmp_path / "huge", lambda c: c["model_config"].update(dim=200000))
    grid = edited(run, tmp_path / "grid", lambda c: c["model_config"].update(grid_size=16))
    escape = tmp_path / "escape"
    shutil.copytree(run, escape)
    (escape / "latest").write_text("../elsewhere")
    busy = tmp_path / "busy"
    busy.mkdir()
    held = checkpoint.lock(str(busy))  # as a second run would find it
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "meta.json").write_text("{")
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
        (["sample"], "the following arguments are required: --ckpt"),
        (["digit", "--label", "three"], "argument --label: invalid int value: 'three'"),
        (train_ + ["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        # inf and nan parse as floats; every float option refuses them
        (train_ + ["--lr", "inf"], "argument --lr: must be a finite number, got 'inf'"),
        (train_ + ["--lr", "fast"], "argument --lr: must be a finite number, got 'fast'"),
        (train_ + ["--weight-decay", "nan"], "argument --weight-decay: must be a finite number"),
        (train_ + ["--dropout=-inf"], "argument --dropout: must be a finite number, got '-inf'"),
        (train_ + ["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got '-1'"),
        (train_ + ["--seed", str(2 ** 64)], "argument --seed: must be an integer in [0, 2**64)"),
        (sample + ["--cfg", "nan"], "argument --cfg: must be a finite number, got 'nan'"),
        (sample + ["--cfg", "inf"], "argument --cfg: must be a finite number, got 'inf'"),
        (sample + ["--resolution", "2x", "--spatial-cfg", "nan"], "argument --spatial-cfg: must be a finite"),
        (sample + ["--temperature", "inf"], "argument --temperature: must be a finite number"),
        (sample + ["--top-p", "nan"], "argument --top-p: must be a finite number"),
        (sample + ["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64)"),
        (["demo", "--cfg", "inf", "--out", tmp_path / "demo"], "argument --cfg: must be a finite"),
        (train_ + ["--data", beyond], "token 17 is outside [0, 17) (17 from the vocabulary of"),
        (train_ + ["--data", one_class], "label 1 is outside [0, 1) (1 from num_classes in its meta"),
        (train_ + ["--data", corrupt], "meta.json is corrupt"),
        (train_ + ["--data", a_file], "unknown dataset"),
        (sample + ["--n", str(10 ** 12)], "--n 1000000000000 rows of 10 columns are "
                                          "10000000000000 pictures; a grid holds at most 1024"),
        (sample + ["--n", "103"], "are 1030 pictures; a grid holds at most 1024"),
        (sample + ["--n", "-3"], "argument --n: must be an integer >= 1, got '-3'"),
        (sample + ["--resolution", "1000x"], "tokens 8000x8000; at most 64x64, so at most 8x"),
        (sample + ["--resolution", "9x"], "tokens 72x72; at most 64x64"),
        (sample + ["--resolution", "x"], "--resolution must be an integer scale of 2 or more"),
        (sample + ["--resolution", "2x", "--ntk-boundary", str(10 ** 30)],
         "--ntk-boundary must be in [0, 4] for"),  # head dim 32 / 2 heads: 4 per axis
        (sample + ["--resolution", "2x", "--ntk-boundary", "5"], "got 5"),
        (sample + ["--resolution", "2x", "--ntk-boundary=-1"], "--ntk-boundary must be >= 0"),
        (["sample", "--ckpt", negative], "config.json is corrupt or unknown: Trying to create "
                                         "tensor with negative dimension -32"),
        (["sample", "--ckpt", huge], "weights do not match its config: 12 of another shape"),
        (["sample", "--ckpt", grid], "the model's grid side is 16 but its tokenizer says 8"),
        (["sample", "--ckpt", escape], "latest names '../elsewhere', not a step-N folder"),
        (["train", "--out", escape, "--resume", "--steps", "9"], "not a step-N folder"),
        (["train", *TINY, "--out", busy], f"--out {busy} is in use by another train (pid "
                                          f"{os.getpid()})"),
    ]
    for args, message in cases:
        before = tree(tmp_path, run)
        one_line_error(capsys, args, message)
        assert tree(tmp_path, run) == before, args  # no --out created, nothing changed
    held.close()


def finished(out, step):
    """The run in ``out`` ends at ``step``: no temporary files, ``latest`` names it, and
    its weights load and are finite."""
    assert not [p for p in os.listdir(out) if checkpoint.TMP in p], os.listdir(out)
    assert (Path(out) / "latest").read_text() == f"step-{step:06d}"
    model, _, _ = checkpoint.load(str(out))
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("writer", ["save_file", "torch.save"])
def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(tmp_path, capsys, monkeypatch, writer):
    module, name = (checkpoint, "save_file") if writer == "save_file" else (checkpoint.torch, "save")
    real, calls = getattr(module, name), []

    def second_fills_the_disk(*args, **kwargs):
        calls.append(None)
        if len(calls) == 1:
            return real(*args, **kwargs)
        with open(args[1], "wb") as f:
            f.write(b"partial")  # what fitted
        if writer == "save_file":
            raise OSError(28, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 68928")
    monkeypatch.setattr(module, name, second_fills_the_disk)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--ckpt-every", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    why = "No space left on device" if writer == "save_file" else "a write failed"
    assert err.startswith(f"sarkernels: error: cannot write checkpoint {out / 'step-000004'} "
                          f"({why}): ") and err.count("\n") == 1, err
    assert err.endswith(f" MiB free there; the newest checkpoint is still {out / 'step-000002'}\n")
    finished(out, 2)


def test_a_run_folder_takes_one_train_at_a_time_until_the_holder_dies(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sarkernels.app import checkpoint; "
         "f = checkpoint.lock(sys.argv[1]); print(flush=True); time.sleep(300)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # it holds the lock now
        one_line_error(capsys, ["train", *TINY, "--steps", "2", "--out", out],
                       f"--out {out} is in use by another train (pid {holder.pid})")
        assert os.listdir(out) == [".lock"]
    finally:
        holder.kill()  # a crash: nothing of the holder's own runs
        holder.wait()
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    finished(out, 2)


def test_a_diverging_loss_stops_before_the_weights_turn_nan(tmp_path, capsys, monkeypatch):
    forward = train._Loss.forward
    steps = []

    def nan_from_step_3(self, *args):
        steps.append(None)
        loss = forward(self, *args)
        return loss * float("nan") if len(steps) >= 3 else loss
    monkeypatch.setattr(train._Loss, "forward", nan_from_step_3)
    out = tmp_path / "run"
    one_line_error(capsys, ["train", *TINY, "--steps", "4", "--ckpt-every", "2", "--out", out],
                   "training diverged at step 3: the loss is nan and the gradient norm nan, so "
                   f"the weights were neither updated nor saved; the newest checkpoint is "
                   f"{out / 'step-000002'}")
    finished(out, 2)


def test_sigterm_during_a_checkpoint_is_an_interrupt(tmp_path, capsys, monkeypatch):
    save_file = checkpoint.save_file
    calls = []

    def terminated_in_the_second(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler raises at the next bytecode
        save_file(*args, **kwargs)
    monkeypatch.setattr(checkpoint, "save_file", terminated_in_the_second)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "6", "--ckpt-every", "2", "--out", str(out)]) == 143
    assert capsys.readouterr().err == (
        f"sarkernels: terminated (SIGTERM); the newest checkpoint is {out / 'step-000002'}: "
        f"continue with python -m sarkernels train --out {out} --resume\n")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put it back
    finished(out, 2)


def test_temporary_files_of_dead_processes_go_at_the_next_start(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    (out / "step-000004.tmp-999999").mkdir()  # a kill -9 in the middle of a checkpoint
    (out / "step-000004.tmp-999999" / "model.safetensors").write_bytes(b"partial")
    (out / "latest.tmp-999999").write_text("step-000004")
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    finished(out, 3)


def test_links_never_lead_out_of_the_run(tmp_path, capsys):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    shutil.copytree(out / "step-000002", elsewhere)
    (out / "step-000009").symlink_to(elsewhere)
    (out / "latest").write_text("step-000009")
    assert checkpoint.resolve(str(out)) == str(out / "step-000002")  # not the link
    capsys.readouterr()
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == [".lock", "latest", "step-000002"]  # the link is gone,
    assert sorted(os.listdir(elsewhere)) == ["config.json", "model.safetensors",  # its target not
                                             "train_state.pt"]
