"""``evaluate``: the ADM suite's metrics against brute-force versions, FID and the rest on a
randomly initialised Inception whose weights the test writes (no hub here), the reference
readers, the CFG sweep's plumbing, the whole path on digits, and its mistakes."""
import json
import os

import numpy as np
import pytest
import torch
from scipy import linalg

from cli_harness import one_line_error, sar  # noqa: F401 (a fixture)
from sarkernels.__main__ import main
from sarkernels.app import evaluate, fid, inception


def brute_precision_recall(ref, samples, k=3):
    dist = lambda a, b: ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)
    radius = lambda x: np.sort(dist(x, x), 1)[:, k]
    d = dist(ref, samples)
    precision = (d <= radius(ref)[:, None]).any(0).mean()
    recall = (d <= radius(samples)[None]).any(1).mean()
    return precision, recall


def test_metrics_agree_with_the_adm_suites_formulas():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 12)), rng.normal(0.3, 1.2, size=(200, 12)) @ rng.normal(size=(12, 12))
    (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)
    root = linalg.sqrtm(s1 @ s2).real  # ADM's
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * root)
    assert fid.frechet(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    assert abs(fid.frechet(mu1, s1, mu1, s1)) < 1e-9
    few = a[:7]  # fewer samples than dimensions
    assert fid.frechet_to(few, mu2, s2) == pytest.approx(fid.frechet(*fid.statistics(few), mu2, s2),
                                                         rel=1e-7)
    assert fid.frechet_to(a, mu2, s2) == pytest.approx(want, rel=1e-9)
    logits = rng.normal(size=(10, 5)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    kl = lambda q: (q * (np.log(q) - np.log(q.mean(0)))).sum(1).mean()
    assert fid.inception_score(logits, split_size=4) == pytest.approx(
        np.mean([np.exp(kl(p[i:i + 4])) for i in (0, 4, 8)]), rel=1e-9)
    ref, samples = rng.normal(size=(40, 6)), rng.normal(0.5, 1, size=(30, 6))
    got = fid.precision_recall(ref, samples, batch=16)  # several blocks
    assert got == pytest.approx(brute_precision_recall(ref, samples), abs=0)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random Inception of torch-fidelity's layout (Kaiming weights keep activations alive
    through its 94 convolutions), saved as a state_dict file."""
    folder = tmp_path_factory.mktemp("inception")
    module = inception._extractor_module()

    class Unloaded(module.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):
            return None
    torch.save({}, folder / "empty.pt")
    torch.manual_seed(0)
    net = Unloaded("x", ["2048"], feature_extractor_weights_path=str(folder / "empty.pt"))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), folder / "inception.pth")
    return str(folder / "inception.pth")


def pictures(seed, n=5, side=16):
    """Smooth random RGB pictures (blocks upsampled), unlike one another."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    return small.repeat(side // 4, 1).repeat(side // 4, 2)


def test_inception_scores_a_set_against_itself_near_zero_and_another_set_higher(
        weights, tmp_path, capsys):
    a, b = pictures(1), pictures(2) // 3 + 170  # b: brighter, lower contrast
    np.savez(tmp_path / "a.npz", a, np.arange(5))
    np.savez(tmp_path / "b.npz", b)
    np.savez(tmp_path / "ref.npz", arr_0=a)  # an ADM batch of images only
    common = ["--ref", str(tmp_path / "ref.npz"), "--inception-weights", weights]
    assert main(["evaluate", str(tmp_path / "a.npz"), *common]) == 0
    same = json.load(open(tmp_path / "a.json"))
    assert "FID" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "b.npz"), *common, "--out",
                 str(tmp_path / "b_scores.json")]) == 0
    other = json.load(open(tmp_path / "b_scores.json"))
    assert same["fid_reference"] == same["sfid_reference"] == "images"
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert same["precision"] == same["recall"] == 1.0
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-6) and other["sfid"] > 0
    assert same["inception_score"] >= 1 and other["inception_score"] >= 1


class Pixels:
    """A cheap stand-in for the feature network: pixel means per channel and their squares."""

    def features(self, images):
        x = images.reshape(len(images), -1, 3).astype(np.float32) / 255
        pool = np.concatenate([x.mean(1), (x ** 2).mean(1), x[:, ::7].reshape(len(x), -1)], 1)
        return {"pool": pool, "logits": pool[:, :3] * 4, "spatial": pool[:, :4]}


def test_an_adm_reference_file_of_statistics_is_used_as_given(tmp_path):
    images = pictures(3, n=8)
    f = Pixels().features(images)
    mu, sigma = fid.statistics(f["pool"])
    np.savez(tmp_path / "stats.npz", mu=mu + 1, sigma=sigma, mu_s=mu[:4], sigma_s=sigma[:4, :4])
    ref = evaluate.read_reference(str(tmp_path / "stats.npz"))
    assert ref.images is None and sorted(ref.stats) == ["mu", "mu_s", "sigma", "sigma_s"]
    got = evaluate.score(images, ref, Pixels(), "inception", {})
    assert got["fid"] == pytest.approx(len(mu), rel=1e-6) and got["fid_reference"] == "file"
    assert abs(got["sfid"]) < 1e-6 and "precision" not in got
    np.savez(tmp_path / "both.npz", arr_0=images, mu=mu + 1, sigma=sigma)
    ref = evaluate.read_reference(str(tmp_path / "both.npz"))
    got = evaluate.score(images, ref, Pixels(), "inception", {})
    assert got["fid"] == pytest.approx(len(mu), rel=1e-6) and got["sfid_reference"] == "images"
    assert got["precision"] == got["recall"] == 1.0
    folder = tmp_path / "pictures" / "cats"
    folder.mkdir(parents=True)
    from PIL import Image
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    assert np.array_equal(evaluate.read_reference(str(tmp_path / "pictures")).images, images)


def test_sample_many_then_evaluate_with_the_digits_judge_against_held_out_digits(
        sar, tmp_path, capsys):
    out = tmp_path / "digits.npz"
    assert main(["sample-many", "--ckpt", sar, "--per-class", "4", "--recipe", "mar",
                 "--no-progress", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--ref", "digits", "--features", "digits"]) == 0
    result = json.load(open(tmp_path / "digits.json"))
    assert result["n"] == 40 and result["fid"] > 0 and "sfid" not in result
    assert 1 <= result["inception_score"] <= 10  # 10 classes
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert f"wrote {tmp_path / 'digits.json'}" in capsys.readouterr().out


def test_cfg_sweep_samples_each_scale_scores_it_and_plots(sar, tmp_path, capsys,
                                                          monkeypatch):
    from sarkernels.app import checkpoint, sample

    monkeypatch.setattr(evaluate, "feature_network", lambda args: Pixels())
    loads, load = [], sample.load
    monkeypatch.setattr(sample, "load", lambda *a: loads.append(1) or load(*a))
    out = tmp_path / "sweep.json"
    args = ["evaluate", "--cfg-sweep", "0:1:0.5", "--ckpt", sar, "--n", "12",
            "--batch", "6", "--recipe", "mar", "--ref", "digits", "--features", "digits",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert len(loads) == 1  # one model for every scale
    report = json.load(open(out))
    assert [r["cfg"] for r in report["results"]] == [0.0, 0.5, 1.0]
    assert report["best"]["fid"] == min(r["fid"] for r in report["results"])
    assert report["settings"]["heads"] == 2 and report["settings"]["preset"] is None
    assert "cfg" not in report["settings"]
    assert open(tmp_path / "sweep.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "sweep")) == [".lock", "cfg-0.5.npz", "cfg-0.npz",
                                                      "cfg-1.npz", "settings.json"]
    assert f"best cfg {report['best']['cfg']:g}" in capsys.readouterr().out
    one_line_error(capsys, [*args[:-2], "--seed", "1", "--out", out],
                   "holds samples sampled with other settings: seed 0 (now 1)")
    # every setting of sample-many's but the scale: --cfg-power too (it was left out)
    one_line_error(capsys, [*args[:-2], "--cfg-power", "2", "--out", out],
                   "cfg_power None (now 2.0): pass the same settings to continue, or "
                   "--overwrite to start over")
    with checkpoint.lock(str(tmp_path / "sweep")):  # as a second sweep would find it
        one_line_error(capsys, args, f"--out {tmp_path / 'sweep'} is in use by another "
                                     f"evaluate --cfg-sweep (pid {os.getpid()})")
    assert main([*args[:2], "1", *args[3:], "--cfg-power", "2", "--overwrite"]) == 0
    assert json.load(open(out))["settings"]["cfg_power"] == 2.0
    assert sorted(os.listdir(tmp_path / "sweep")) == [".lock", "cfg-1.npz", "settings.json"]


def test_mistakes_are_one_line_and_write_nothing(tmp_path, capsys):
    np.savez(tmp_path / "float.npz", np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "grey.npz", np.zeros((4, 8, 8), np.uint8))
    np.savez(tmp_path / "big.npz", np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "labels.npz", labels=np.zeros(4))
    np.savez(tmp_path / "ok.npz", np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    before = sorted(os.listdir(tmp_path))
    ok = tmp_path / "ok.npz"
    for args, message in [
        ([tmp_path / "float.npz", "--ref", "digits"],
         "must hold uint8 images [N, H, W, 3] (the ADM format), got float32 [4, 8, 8, 3]"),
        ([tmp_path / "grey.npz", "--ref", "digits"], "got uint8 [4, 8, 8]"),
        ([tmp_path / "labels.npz", "--ref", "digits"], "has no arr_0 (it has labels)"),
        ([tmp_path / "junk.npz", "--ref", "digits"], "is not a readable .npz"),
        ([tmp_path / "nope.npz", "--ref", "digits"], "SAMPLES"),
        ([ok, "--ref", tmp_path / "missing.npz"], "--ref"),
        ([ok, "--ref", tmp_path / "labels.npz"], "has neither images (arr_0) nor statistics"),
        ([tmp_path / "big.npz", "--ref", "digits"],
         "the samples are 16x16 but --ref 'digits' is 8x8: score samples against a reference "
         "of their resolution"),
        ([ok, "--ref", "digits", "--inception-weights", tmp_path / "none.pth"],
         "does not exist: download https://"),
        ([ok, "--ref", "digits", "--inception-weights", tmp_path / "junk.pth"],
         "are corrupt or not a state_dict"),
        ([ok, "--ref", "digits", "--out", tmp_path / "no" / "x.json"], "does not exist"),
        (["--ref", "digits"], "give SAMPLES.npz to score"),
        (["--ref", "digits", "--cfg-sweep", "1:0:1", "--ckpt", "x"], "--cfg-sweep '1:0:1'"),
        (["--ref", "digits", "--cfg-sweep", "1,2"], "pass --ckpt and no SAMPLES.npz"),
    ]:
        one_line_error(capsys, ["evaluate", *args], message)
    assert sorted(os.listdir(tmp_path)) == before


def test_scoring_one_file_refuses_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_line_error(capsys, ["evaluate", tmp_path / "s.npz", "--ref", "digits"],
                   "evaluate SAMPLES.npz runs in one process: start it without torchrun")


def test_weights_missing_from_the_usual_place_say_how_to_get_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    np.savez(tmp_path / "ok.npz", np.zeros((4, 8, 8, 3), np.uint8))
    path = tmp_path / "checkpoints" / inception.WEIGHTS
    one_line_error(capsys, ["evaluate", tmp_path / "ok.npz", "--ref", "digits"],
                   f"{inception.WEIGHTS} to {path} (or anywhere, and pass --inception-weights FILE)")
