"""``sample-many``: a digits checkpoint to the ADM suite's .npz, the same images for 1 and 2
processes, resumable shards (an interrupted run continues to the same file; a corrupt
shard is redone, never merged), and its mistakes found before any sampling."""
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_harness import no_work, one_line_error, sar  # noqa: F401 (fixtures)
from sarkernels.__main__ import main
from sarkernels.app import checkpoint, sample_many

MANY = ["--per-class", "3", "--batch", "8", "--recipe", "mar", "--cfg", "1.5", "--no-progress"]


@pytest.fixture(scope="module")
def reference(sar, tmp_path_factory):
    """An uninterrupted run's file: 30 images in 4 batches (the last of 6)."""
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    assert main(["sample-many", "--ckpt", sar, *MANY, "--out", str(out)]) == 0
    with np.load(out) as f:
        return f["arr_0"], f["arr_1"]


def test_the_npz_is_the_adm_format_with_exact_labels_per_class(reference, sar, tmp_path):
    images, labels = reference
    assert images.dtype == np.uint8 and images.shape == (30, 8, 8, 3)
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert (images[..., 0] == images[..., 2]).all() and images.max() > 0  # grey digits as RGB
    assert len({im.tobytes() for im in images}) > 1
    assert not os.path.exists(sample_many.parts_folder(str(tmp_path / "ref.npz")))
    out = tmp_path / "random.npz"
    assert main(["sample-many", "--ckpt", sar, "--n", "5", "--batch", "4", "--recipe", "mar",
                 "--seed", "3", "--no-progress", "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["arr_0"].shape == (5, 8, 8, 3)
        assert f["arr_1"].tolist() == sample_many.labels(10, n=5, seed=3).tolist()


def test_one_and_two_processes_sample_the_same_images(reference, sar, tmp_path):
    out = tmp_path / "two.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "-m", "sarkernels", "sample-many", "--ckpt", sar, *MANY,
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "images/s per process while sampling: " in res.stdout
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], reference[0]) and np.array_equal(f["arr_1"], reference[1])


GLOO_THREADS_AFTER_DESTROY = """
import os, sys, torch
from sarkernels.app import checkpoint
from sarkernels.app.train import distributed
distributed("cpu")
checkpoint.load(sys.argv[1])  # imports dynamo, which once kept the group alive
torch.distributed.destroy_process_group()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("gloo threads:", sorted(n for n in names if "gloo" in n))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's thread list")
def test_the_process_group_ends_with_destroy_not_at_interpreter_shutdown(sar, tmp_path):
    """A group outliving destroy_process_group leaves gloo's threads to release their last
    tensors while Python shuts down: an abort in about one run in seven."""
    script = tmp_path / "joined.py"
    script.write_text(GLOO_THREADS_AFTER_DESTROY)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(script), sar], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("gloo threads: []") == 2, res.stdout


def test_a_killed_run_continues_to_the_same_file_and_redoes_corrupt_shards(
        reference, sar, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "s.npz")
    parts = sample_many.parts_folder(out)
    write, written = sample_many.write_shard, []

    def killed_at_the_third(path, *args):
        if len(written) == 2:
            raise KeyboardInterrupt
        write(path, *args)
        written.append(path)
    monkeypatch.setattr(sample_many, "write_shard", killed_at_the_third)
    assert main(["sample-many", "--ckpt", sar, *MANY, "--out", out]) == 130
    assert f"finished batches in {parts} are kept" in capsys.readouterr().err
    monkeypatch.undo()
    assert sorted(os.listdir(parts)) == [".lock", "batch-000000.npz", "batch-000001.npz",
                                         "settings.json"]
    assert not os.path.exists(out)
    one_line_error(capsys, ["sample-many", "--ckpt", sar, *MANY, "--out", out, "--seed", "1"],
                   "holds shards sampled with other settings: seed 0 (now 1)")
    # shard 0 with a flipped byte (its CRC fails), shard 1 of another batch's labels, and a
    # dead writer's temporary file
    shard0 = sample_many.shard_path(parts, 0)
    raw = bytearray(open(shard0, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(shard0, "wb").write(raw)
    with np.load(sample_many.shard_path(parts, 1)) as f:
        sample_many.write_shard(sample_many.shard_path(parts, 1), f["images"], f["labels"] + 1)
    open(sample_many.shard_path(parts, 2) + sample_many.TMP + "999", "wb").write(b"half")
    assert main(["sample-many", "--ckpt", sar, *MANY, "--out", out]) == 0
    err = capsys.readouterr().err
    assert f"redoing {shard0}: BadZipFile" in err
    assert f"redoing {sample_many.shard_path(parts, 1)}: its labels are not this batch's" in err
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], reference[0]) and np.array_equal(f["arr_1"], reference[1])
    assert not os.path.exists(parts)
    one_line_error(capsys, ["sample-many", "--ckpt", sar, *MANY, "--out", out],
                   "exists: pass --overwrite")


def test_a_second_run_into_the_same_out_stops_before_touching_it(sar, tmp_path, capsys,
                                                                 no_work):
    out = str(tmp_path / "s.npz")
    parts = sample_many.parts_folder(out)
    os.makedirs(parts)
    live = os.path.join(parts, "batch-000000.npz" + sample_many.TMP + "1")  # being written
    open(live, "wb").close()
    with checkpoint.lock(parts):  # as the second run would find the first
        before = sorted(os.listdir(parts))
        for more in ([], ["--overwrite"]):
            one_line_error(capsys, ["sample-many", "--ckpt", sar, *MANY, *more, "--out", out],
                           f"--out {parts} is in use by another sample-many (pid {os.getpid()})")
            assert sorted(os.listdir(parts)) == before


def test_the_merge_writes_its_temporary_among_the_shards(sar, tmp_path, monkeypatch):
    """A killed merge's file (as large as --out) is then removed with the shards."""
    out = str(tmp_path / "s.npz")
    replace, moved = os.replace, []
    monkeypatch.setattr(os, "replace", lambda src, dst: moved.append((src, dst)) or
                        replace(src, dst))
    assert main(["sample-many", "--ckpt", sar, "--n", "2", "--batch", "2", "--recipe", "mar",
                 "--no-progress", "--out", out]) == 0
    (merged,) = [src for src, dst in moved if dst == out]
    assert os.path.dirname(merged) == sample_many.parts_folder(out)
    assert os.listdir(tmp_path) == ["s.npz"]


def test_merge_never_takes_a_corrupt_shard(tmp_path):
    batches = [np.array([0, 1]), np.array([2])]
    parts = str(tmp_path)
    sample_many.write_shard(sample_many.shard_path(parts, 0), np.zeros((2, 4, 4, 3), np.uint8),
                            batches[0])
    sample_many.write_shard(sample_many.shard_path(parts, 1), np.zeros((1, 4, 4, 1), np.uint8),
                            batches[1])
    out = str(tmp_path / "out.npz")
    with pytest.raises(ValueError, match="batch-000001.npz is corrupt .*uint8 \\[1, H, W, 3\\]"):
        sample_many.merge(parts, out, batches)
    assert not os.path.exists(out) and [n for n in os.listdir(parts) if sample_many.TMP in n] == []


@pytest.mark.parametrize("args, message", [
    (["--n", "4", "--per-class", "2"], "give one of --n N (labels drawn at random) and --per-class K"),
    ([], "give one of --n N"),
    (["--n", "4", "--out", "x.png"], "--out 'x.png' must end in .npz"),
    (["--n", "4", "--precision", "bf16"], "--precision bf16 is for CUDA devices"),
    (["--n", "4", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["--n", "4", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--n", "0"], "--n: must be an integer >= 1, got '0'"),
])
def test_mistakes_are_one_line_before_any_sampling(args, message, tmp_path, capsys, no_work):
    out = tmp_path / "s.npz"
    argv = ["sample-many", "--ckpt", str(tmp_path), *args]
    one_line_error(capsys, argv if "--out" in args else argv + ["--out", out], message)
    assert os.listdir(tmp_path) == []


def test_settings_record_the_official_preset_and_the_resolved_heads(tmp_path):
    from types import SimpleNamespace

    from sarkernels.app.cli_args import parser

    ckpt = tmp_path / "RandAR-XL.safetensors"
    ckpt.write_bytes(b"")
    args = parser().parse_args(["sample-many", "--ckpt", str(ckpt), "--preset", "XL", "--vq",
                                "vq.pt", "--n", "4"])
    want = sample_many.settings(args, SimpleNamespace(n_head=20), {"model": "randar",
                                                                   "num_classes": 1000}, ckpt)
    assert (want["preset"], want["heads"], want["n"]) == ("XL", 20, 4)
