"""Careless use of a run folder and of checkpoints, and errors and interrupts while training:
one ``sarkernels: error:`` line and exit status 2 (test_cli_hostile.py has the table of
mistakes found before any work). test_cli.py runs the real ``python -m sarkernels``."""
import os
import shutil

from cli_harness import TINY, one_line_error, run  # noqa: F401 (run: a fixture)
from sarkernels.__main__ import main
from sarkernels.app import checkpoint
from sarkernels.app.train import TrainConfig, train


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



def test_prompts_without_the_text_extra_leave_no_run_folder(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # as if not installed
    out = tmp_path / "text"
    one_line_error(capsys, ["train", "--model", "randar", *TINY, "--condition", "prompts",
                            "--out", out], "pip install 'sarkernels[text]'")
    assert not out.exists()
