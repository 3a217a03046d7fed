"""SAR's training distribution of set counts (``train_steps`` / ``train --sar-sets``): a
fixed count, an inclusive range or a list, each count drawn uniformly; bad values are one
clear error before any work; the setting lives in config.json for resume and sample."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sarkernels import orders
from sarkernels.app import checkpoint
from sarkernels.models import SARTransformer
from sarkernels.app.train import TrainConfig, train

TINY = dict(dim=32, heads=2, layers=1, batch=8, warmup=2, ckpt_every=5)
N = 16  # tokens of the 4x4 model below


def tiny_sar(**over):
    return SARTransformer(vocab_size=17, num_classes=10, grid_size=4, dim=32, encoder_layers=1,
                          decoder_layers=1, n_head=2, multiple_of=32, **over)


def drawn_counts(model, batch, seed):
    layout = model.training_layout(batch, torch.Generator().manual_seed(seed))
    sets = layout["sets"]
    # each row: set ids 1..K in order, so the sizes are positive and sum to the N tokens
    assert sets.shape == (batch, N) and (sets[:, 0] == 1).all()
    steps = sets.diff(dim=1)
    assert ((steps == 0) | (steps == 1)).all()
    return sets[:, -1].tolist()


@pytest.mark.parametrize("spec,allowed", [
    (5, [5]), ("3-6", [3, 4, 5, 6]), (range(3, 7), [3, 4, 5, 6]), ([2, 8, 16], [2, 8, 16]),
    ("1,16", [1, 16]), (None, list(range(1, N + 1))), ("all", list(range(1, N + 1)))])
@pytest.mark.parametrize("schedule", ["random", "constant", "cosine"])
def test_training_draws_every_allowed_count_and_no_other(spec, allowed, schedule):
    model = tiny_sar(train_steps=spec, train_schedule=schedule)
    counts = drawn_counts(model, 60 * len(allowed), seed=len(allowed))
    assert sorted(set(counts)) == allowed
    # uniform: each count near its share (binomial, 60 expected; 6 sigma from chance)
    assert all(abs(counts.count(k) - 60) < 6 * 60 ** 0.5 for k in allowed), counts


def test_the_default_draws_what_it_drew_before():
    """None keeps its old stream: K = randint(1, N + 1) from the generator, then the sizes."""
    gen, model = torch.Generator().manual_seed(3), tiny_sar()
    layout = model.training_layout(20, torch.Generator().manual_seed(3))
    for row in layout["sets"]:
        k = int(torch.randint(1, N + 1, (), generator=gen))
        assert torch.equal(row, orders.set_ids(orders.set_sizes("random", N, k, gen)))


@pytest.mark.parametrize("spec,message", [
    (0, "must be >= 1, got 0"), ("0", "must be >= 1, got '0'"),
    (17, "must be in [1, 16] for 16 tokens, got 17"), ("4-17", "must be in [1, 16]"),
    ("4-", "cannot read '4-' as set counts"), ("a", "cannot read 'a'"),
    ("", "cannot read ''"), ("4,,8", "cannot read"), ("8-4", "the range '8-4' is empty"),
    ([], "one or more integers"), ([2.5], "one or more integers"), (True, "one or more integers")])
def test_bad_counts_are_rejected_naming_the_argument(spec, message):
    with pytest.raises(ValueError, match="train_steps: .*" + message.replace("[", r"\[")
                       .replace("]", r"\]")):
        tiny_sar(train_steps=spec)


def test_config_json_keeps_the_counts_and_resume_and_load_see_them(tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(model="sar", steps=2, out=out, sar_sets="2-4", **TINY), progress=False)
    model, config, _ = checkpoint.load(out)
    assert config["train"]["sar_sets"] == "2-4" and model.config.train_steps == [2, 3, 4]
    res = subprocess.run([sys.executable, "-m", "sarkernels", "train", "--out", out, "--resume",
                          "--sar-sets", "16", "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 2 and "--sar-sets '16' (the run has '2-4')" in res.stderr


def test_checkpoints_from_before_the_option_load_and_resume(tmp_path):
    out = str(tmp_path / "old")
    train(TrainConfig(model="sar", steps=2, out=out, **TINY), progress=False)
    step = checkpoint.resolve(out)
    path = os.path.join(step, "config.json")
    config = json.load(open(path))
    del config["train"]["sar_sets"]  # as written before --sar-sets existed
    json.dump(config, open(path, "w"))
    assert checkpoint.load(out)[0].config.train_steps is None
    res = subprocess.run([sys.executable, "-m", "sarkernels", "train", "--out", out, "--resume",
                          "--steps", "3", "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.load(open(os.path.join(checkpoint.resolve(out), "config.json")))[
        "train"]["sar_sets"] == "all"


@pytest.mark.parametrize("args,message", [
    (["--sar-sets", "0"], "--sar-sets: set counts must be >= 1, got '0'"),
    (["--sar-sets", "65"], "--sar-sets: set counts must be in [1, 64] for 64 tokens, got '65'"),
    (["--sar-sets", "4-"], "--sar-sets: cannot read '4-' as set counts"),
    (["--sar-sets", "a"], "--sar-sets: cannot read 'a' as set counts"),
    (["--sar-sets", "8,300", "--grid", "16"], "must be in [1, 256] for 256 tokens"),
    (["--sar-sets", "16", "--sar-schedule", "mar"], "--sar-schedule mar trains one set"),
])
def test_cli_rejects_bad_set_counts_before_any_work(tmp_path, args, message):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "sarkernels", "train", "--out", str(out), *args],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("sarkernels: error:") and res.stderr.count("\n") == 1
    assert message in res.stderr and res.stdout == "", res.stderr
    assert not out.exists()


def test_cli_help_gives_the_default_and_meaning():
    res = subprocess.run([sys.executable, "-m", "sarkernels", "train", "--help"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    line = next(x for x in res.stdout.splitlines() if x.strip().startswith("--sar-sets"))
    assert "LO-HI" in line and "(default: all)" in line
