"""The main job's command line: train/resume/checkpoints, 2-process training, sample, demo,
and clear errors."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import sarkernels.app.demo
from sarkernels.app import blas, checkpoint, data, sample
from sarkernels.app.train import TrainConfig, train

TINY = dict(dim=32, heads=2, layers=1, batch=8, warmup=2, ckpt_every=5, dropout=0.0)


def cli(*args, check=True, env=None):
    res = subprocess.run([sys.executable, "-m", "sarkernels", *args], capture_output=True,
                         text=True, env=env)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def weights(run):
    return load_file(os.path.join(checkpoint.resolve(run), "model.safetensors"))


@contextlib.contextmanager
def busy_sibling():
    """Another thread doing torch work throughout, so the training threads run with the
    timing of a busy machine: a result that depended on it would differ from a quiet run."""
    stop = threading.Event()

    def work():
        x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))  # not the global RNG
        while not stop.wait(0.0005):  # a share of the cores, not all of them
            x = (x @ x).tanh()

    sibling = threading.Thread(target=work)
    sibling.start()
    try:
        yield
    finally:
        stop.set()
        sibling.join()


@pytest.mark.parametrize("model", ["sar", "randar", "rar", "rar-official"])
def test_resume_continues_exactly(tmp_path, model):
    cfg = lambda run: TrainConfig(model=model, steps=10, out=str(tmp_path / run), **TINY)
    straight = train(cfg("a"), progress=False)
    train(cfg("b"), progress=False)
    # as if the run had been killed after its step-5 checkpoint
    shutil.rmtree(tmp_path / "b" / "step-000010")
    (tmp_path / "b" / "latest").write_text("step-000005")
    with busy_sibling():
        resumed = train(cfg("b"), resume=True, progress=False)
    assert os.path.basename(straight) == os.path.basename(resumed) == "step-000010"
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("strict", [True, False])
def test_resume_on_another_thread_count(tmp_path, monkeypatch, strict):
    """Says that the bits may differ only where MKL's strict mode is off (blas.py)."""
    monkeypatch.setattr(blas, "STRICT", strict)
    cfg = lambda steps: TrainConfig(model="rar", steps=steps, out=str(tmp_path), **TINY)
    threads = torch.get_num_threads()
    train(cfg(5), progress=False)
    same, other = [], []
    train(cfg(6), resume=True, progress=False, log=same.append)
    try:
        torch.set_num_threads(threads + 1)
        train(cfg(7), resume=True, progress=False, log=other.append)
    finally:
        torch.set_num_threads(threads)
    assert not any("threads" in line for line in same)
    said = any(f"trained on {threads} CPU threads and continues on {threads + 1}" in line
               for line in other)
    assert said == (not strict), other


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL")
def test_importing_the_app_sets_mkl_strict():
    code = "import sarkernels.app.blas as b; print(b.STRICT)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "MKL_CBWR"})
    assert out.stdout.strip() == "True", out.stderr


def test_checkpoint_layout_and_reload(tmp_path):
    final = train(TrainConfig(model="randar", steps=12, out=str(tmp_path), **TINY), progress=False)
    steps = sorted(d for d in os.listdir(tmp_path) if d.startswith("step-"))
    assert steps == ["step-000010", "step-000012"]  # older ones pruned, no temp folders
    assert open(tmp_path / "latest").read() == "step-000012"
    config = json.load(open(os.path.join(final, "config.json")))
    assert config["model"] == "randar" and config["step"] == 12
    model, _, _ = checkpoint.load(str(tmp_path))
    for k, v in weights(tmp_path).items():
        assert torch.equal(model.state_dict()[k], v)


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = train(TrainConfig(model="rar", steps=5, out=str(tmp_path), **TINY), progress=False)
    before = weights(tmp_path)

    def dies(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"partial")  # a half-written file, then the process is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", dies)
    m, config, _ = checkpoint.load(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(tmp_path), 10, m, config)
    assert open(tmp_path / "latest").read() == os.path.basename(model)
    assert not os.path.exists(tmp_path / "step-000010")
    after = weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    common = ["--model", "randar", "--steps", "6", "--dim", "32", "--heads", "2", "--layers", "1",
              "--batch", "8", "--warmup", "2", "--dropout", "0.0", "--no-progress"]
    cli("train", *common, "--out", str(tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "-m", "sarkernels", "train", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=900)  # a hung rendezvous fails the test instead of the whole run
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-4, msg=k)


def test_sample_cli_and_inpainting(tmp_path):
    run = str(tmp_path / "run")
    train(TrainConfig(model="sar", steps=3, out=run, **TINY), progress=False)
    out = tmp_path / "grid.png"
    cli("sample", "--ckpt", run, "--recipe", "mar", "--labels", "3,1,4", "--n", "2", "--out", str(out))
    from PIL import Image
    assert Image.open(out).size[0] > 3 * 48
    digit = str(tmp_path / "digit.png")
    cli("digit", "--label", "7", "--index", "2", "--out", digit)  # the README's way to get one
    held_out = data.digits(8, "held_out")
    want = held_out.tokens[(held_out.labels == 7).nonzero()[2, 0]]
    pixels = Image.open(digit)
    assert pixels.size == (8, 8) and pixels.getextrema() == (0, 255)  # bright ink on black
    assert torch.equal(sample.image_tokens(digit, held_out.tokenizer), want)
    cli("sample", "--ckpt", run, "--labels", "7", "--image", digit, "--mask", "top",
        "--out", str(tmp_path / "inpaint.png"))
    assert os.path.exists(tmp_path / "inpaint.png")


def test_grid_16_trains_and_samples(tmp_path):
    run = str(tmp_path / "run16")
    cli("train", "--model", "sar", "--grid", "16", "--steps", "2", "--dim", "32", "--heads", "2",
        "--layers", "1", "--batch", "4", "--out", run, "--no-progress")
    model, config, _ = checkpoint.load(run)
    assert config["tokenizer"] == {"name": "digits", "grid": 16} and model.n_tokens == 256
    cli("sample", "--ckpt", run, "--recipe", "mar", "--labels", "5", "--out", str(tmp_path / "g.png"))


def test_errors_are_one_clear_line(tmp_path):
    run = str(tmp_path / "run")
    train(TrainConfig(model="randar", steps=2, out=run, **TINY), progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint.resolve(run), bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(100)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(checkpoint.resolve(run), mismatched)
    config = json.load(open(mismatched / "config.json"))
    config["model_config"]["dim"] = 64
    json.dump(config, open(mismatched / "config.json", "w"))
    cases = [
        (["sample", "--ckpt", str(tmp_path / "nowhere")], "does not exist"),
        (["sample", "--ckpt", str(tmp_path)], "not a sarkernels checkpoint"),
        (["sample", "--ckpt", str(bad)], "corrupt"),
        (["sample", "--ckpt", str(mismatched)], "do not match its config"),
        (["sample", "--ckpt", run, "--recipe", "zigzag"], "unknown recipe"),
        (["sample", "--ckpt", run, "--recipe", "mar"], "recipe 'mar' is for sar"),
        (["sample", "--ckpt", run, "--labels", "3,12"], "--labels must be in"),
        (["sample", "--ckpt", run, "--labels", "a"], "comma-separated integers"),
        (["sample", "--ckpt", run, "--image", str(tmp_path / "none.png")], "cannot read image"),
        (["train", "--model", "sar", "--resume", "--out", str(tmp_path / "empty")], "does not exist"),
        (["train", "--data", "cifar", "--out", str(tmp_path / "x")], "unknown dataset"),
        (["train", "--steps", "0", "--out", str(tmp_path / "x")], "--steps must be >= 1"),
        (["demo", "--cfg", "-1", "--out", str(tmp_path / "demo")], "cfg_scale must be >= 0"),
    ]
    for args, message in cases:
        res = cli(*args, check=False)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr and message in res.stderr, (args, res.stderr)
        assert res.stderr.startswith("sarkernels: error:") and res.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "demo")  # rejected before two models were trained


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    res = cli("demo", "--quick", "--out", str(out))
    assert "best recipe" in res.stdout
    report = json.load(open(out / "report.json"))
    assert [(r["model"], r["recipe"], r["steps"]) for r in report["recipes"]] == [
        ("sar", "ar", 64), *[("sar", "sar-ts", k) for k in (4, 8, 16, 32, 64)], ("sar", "mar", 4),
        ("randar", "randar-parallel", 22), ("randar", "randar-ar", 64)]
    assert report["models"]["sar"]["train_sets"] == sarkernels.app.demo.SAR_TRAIN_SETS
    assert report["judge_held_out_accuracy"] > 0.9
    for name in ("samples.png", "inpainting.png", "report.md"):
        assert os.path.getsize(out / name) > 0


def test_ctrl_c_before_the_first_checkpoint_says_none_was_written(tmp_path):
    out = tmp_path / "run"
    # A child inherits an ignored SIGINT (a test run started with nohup or `&` from a script)
    # and its Python then leaves it ignored; a handled one is reset to the default at exec.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sarkernels", "train", "--dim", "32", "--heads", "2",
             "--layers", "1", "--batch", "8", "--steps", "100000", "--out", str(out),
             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, ignored)
    try:
        deadline = time.monotonic() + 300
        while not out.exists():  # the run folder appears just before training starts
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:  # a run that ignored the interrupt must not outlive the test (100000 steps)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and err == "sarkernels: interrupted; no checkpoint was written yet\n"


def test_plain_install_runs_info_and_help_and_names_the_extra(tmp_path):
    """What `pip install .` gives: no scikit-learn, scipy or pillow (the [demo] extra)."""
    script = """
import contextlib, io, json, runpy, sys
for name in ("sklearn", "scipy", "PIL"):
    sys.modules[name] = None  # not installed
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["python -m sarkernels", *argv]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("sarkernels", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            results.append([exc.code, err.getvalue()])
print(json.dumps(results))
"""
    works = [["--help"], ["info"], ["info", "--json"]] + [
        [command, "--help"] for command in ("train", "sample", "tokenize", "demo", "digit")]
    needs = [(["train", "--steps", "1", "--out", str(tmp_path / "run")],
              "'train --data digits' needs scikit-learn"),
             (["sample", "--ckpt", str(tmp_path)], "'sample' needs pillow"),
             (["tokenize", "--images", str(tmp_path), "--vq", "vq.pt", "--out", str(tmp_path / "t")],
              "'tokenize' needs pillow"),
             (["demo"], "'demo' needs scikit-learn, scipy, pillow"),
             (["digit", "--label", "3"], "'digit' needs scikit-learn, pillow")]
    res = subprocess.run([sys.executable, "-c", script, json.dumps(works + [a for a, _ in needs])],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout)
    assert [code for code, _ in results[:len(works)]] == [0] * len(works), results
    for (code, err), (_, message) in zip(results[len(works):], needs):
        assert code == 2 and err == (f"sarkernels: error: {message}, which a plain install "
                                     "lacks: pip install 'sarkernels[demo]'\n"), err
