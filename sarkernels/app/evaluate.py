"""``python -m sarkernels evaluate``: FID, sFID, Inception Score, precision and recall of a
``.npz`` of samples against a reference, as the ADM evaluation suite computes them (see
:mod:`.fid` and :mod:`.inception`); ``--cfg-sweep`` samples a checkpoint at each guidance
scale (RandAR's ``search_cfg_weights.py``) and scores each."""
import copy
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from . import fid
from .cli_args import UsageError

DIGITS = "digits"
MAX_SWEEP = 50


@dataclass
class Reference:
    """Reference images (None: statistics only) and the statistics an ADM file holds."""
    name: str
    images: np.ndarray = None
    stats: dict = field(default_factory=dict)


def check_images(images, what):
    """uint8 ``[N, H, W, 3]`` with N >= 2 (a covariance), or a UsageError naming ``what``."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise UsageError(f"{what} must hold uint8 images [N, H, W, 3] (the ADM format), got "
                         f"{images.dtype} {list(images.shape)}")
    if len(images) < 2:
        raise UsageError(f"{what} holds {len(images)} image(s); a covariance needs at least 2")
    return images


def _load_npz(path, what):
    try:
        return np.load(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{what} {path!r} is not a readable .npz ({type(exc).__name__}: "
                         f"{exc})") from None


def read_samples(path):
    """The images of an ``.npz`` written by sample-many (or the ADM suite's samplers)."""
    if not os.path.isfile(path):
        raise UsageError(f"SAMPLES {path!r} does not exist")
    with _load_npz(path, "SAMPLES") as f:
        if "arr_0" not in f.files:
            raise UsageError(f"SAMPLES {path!r} has no arr_0 (it has {', '.join(f.files)})")
        return check_images(f["arr_0"], f"SAMPLES {path!r}")


def read_reference(ref):
    """``digits``, a folder of images, or an ADM reference batch (.npz)."""
    if ref == DIGITS:
        from . import data
        from .sample_many import to_uint8

        held_out = data.digits(8, "held_out")
        return Reference(DIGITS, to_uint8(held_out.tokenizer.decode(held_out.tokens)))
    if os.path.isdir(ref):
        return Reference(ref, check_images(_folder_images(ref), f"--ref {ref!r}"))
    if not os.path.isfile(ref):
        raise UsageError(f"--ref {ref!r} does not exist (give an ADM .npz, a folder of images "
                         f"or {DIGITS})")
    with _load_npz(ref, "--ref") as f:
        stats = {k: f[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")
                 if k in f.files}
        images = check_images(f["arr_0"], f"--ref {ref!r}") if "arr_0" in f.files else None
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mu in stats) != (sigma in stats) or mu in stats and (
                stats[mu].ndim != 1 or stats[sigma].shape != (len(stats[mu]),) * 2):
            raise UsageError(f"--ref {ref!r}: {mu} must be [D] and {sigma} [D, D], got "
                             f"{[list(stats[k].shape) for k in (mu, sigma) if k in stats]}")
    if images is None and "mu" not in stats:
        raise UsageError(f"--ref {ref!r} has neither images (arr_0) nor statistics (mu, sigma)")
    return Reference(ref, images, stats)


def _folder_images(root):
    from .sample import open_picture
    from .tokenize import IMAGE_EXTENSIONS

    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                   if n.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise UsageError(f"--ref {root!r} holds no images")
    images = [np.asarray(open_picture(p).convert("RGB")) for p in paths]
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise UsageError(f"--ref {root!r} holds images of {len(sizes)} sizes (such as "
                         f"{', '.join(f'{s[1]}x{s[0]}' for s in sorted(sizes)[:2])}); the "
                         "reference must have one resolution")
    return np.stack(images)


class DigitsFeatures:
    """The digits demo's judge (an MLP trained on the real training digits) as the feature
    network: its hidden layer for FID, precision and recall, its logits for the IS."""

    def __init__(self):
        from . import data
        from .metrics import DigitsJudge

        train = data.digits(8, "train")
        self.judge = DigitsJudge(train.tokenizer.decode(train.tokens), train.labels)

    def features(self, images):
        import torch

        grey = torch.from_numpy(images).float().mean(-1)[:, None] / 255
        return {"pool": self.judge.features(grey), "logits": self.judge.logits(grey),
                "spatial": None}


def feature_network(args):
    if args.features == DIGITS:
        return DigitsFeatures()
    from .inception import Inception

    return Inception(args.inception_weights, args.device, args.feature_batch)


def check_pair(shape, ref, features):
    """Samples of ``shape`` against ``ref``: one resolution, and statistics of the network."""
    if ref.images is not None and ref.images.shape[1:] != shape[1:]:
        (h, w), (rh, rw) = shape[1:3], ref.images.shape[1:3]
        raise UsageError(f"the samples are {w}x{h} but --ref {ref.name!r} is {rw}x{rh}: score "
                         "samples against a reference of their resolution")
    if features == DIGITS and ref.images is None:
        raise UsageError(f"--ref {ref.name!r} holds only Inception statistics: --features "
                         "digits needs reference images")


def score(images, ref, net, features, ref_features):
    """The metrics of ``images`` against ``ref``; ``ref_features`` (a dict) caches the
    reference's features between calls."""
    if ref.images is not None and not ref_features:
        ref_features.update(net.features(ref.images))
    f = net.features(images)
    stored = features != DIGITS  # an ADM file's statistics are Inception's
    result = {"n": len(images)}
    for metric, key, mu, sigma in (("fid", "pool", "mu", "sigma"),
                                   ("sfid", "spatial", "mu_s", "sigma_s")):
        if f[key] is None:
            continue
        if stored and mu in ref.stats:
            ref_stats, result[f"{metric}_reference"] = (ref.stats[mu], ref.stats[sigma]), "file"
        elif ref_features:
            ref_stats, result[f"{metric}_reference"] = fid.statistics(ref_features[key]), "images"
        else:
            continue
        if len(ref_stats[0]) != f[key].shape[1]:
            raise UsageError(f"--ref {ref.name!r}: {mu} has {len(ref_stats[0])} features but "
                             f"the {features} network gives {f[key].shape[1]}")
        result[metric] = fid.frechet_to(f[key], *ref_stats)
    result["inception_score"] = fid.inception_score(f["logits"])
    if ref_features:
        result["precision"], result["recall"] = fid.precision_recall(ref_features["pool"],
                                                                     f["pool"])
    return result


def _json_out(path):
    if os.path.isdir(path):
        raise UsageError(f"--out {path!r} is a folder; give a .json file name")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"--out {path!r}: folder {parent!r} does not exist")
    return path


def _line(result):
    names = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"),
             ("precision", "precision"), ("recall", "recall"))
    return ", ".join(f"{label} {result[k]:.4g}" for k, label in names if k in result)


def run(args):
    """The ``evaluate`` command."""
    if args.cfg_sweep is not None:
        return sweep(args)
    if args.samples is None:
        raise UsageError("give SAMPLES.npz to score (or --cfg-sweep with --ckpt)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would score and write
        raise UsageError("evaluate SAMPLES.npz runs in one process: start it without torchrun "
                         "(only --cfg-sweep samples across processes)")
    out = _json_out(args.out or os.path.splitext(args.samples)[0] + ".json")
    images = read_samples(args.samples)
    ref = read_reference(args.ref)
    check_pair(images.shape, ref, args.features)
    result = {"samples": args.samples, "ref": args.ref, "features": args.features,
              **score(images, ref, feature_network(args), args.features, {})}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{_line(result)} ({len(images)} samples, {args.features} features); wrote {out}")
    return result


def parse_sweep(text):
    """``START:STOP:STEP`` (inclusive) or ``a,b,c``: guidance scales >= 0."""
    example = "give START:STOP:STEP such as 1:4:0.5, or a list such as 1,1.5,2"
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            values = [round(start + i * step, 10)
                      for i in range(int(math.floor((stop - start) / step + 1e-9)) + 1)]
        else:
            values = [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--cfg-sweep {text!r}: {example}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or len(values) > MAX_SWEEP:
        raise UsageError(f"--cfg-sweep {text!r} must be at most {MAX_SWEEP} finite scales "
                         f">= 0: {example}")
    return values


def sweep(args):
    """``evaluate --cfg-sweep``: sample-many at each scale into OUT's folder (resumable: a
    finished scale's .npz is kept; the folder's settings.json holds sample-many's settings
    but the scale, and process 0 locks the folder), score each, report the best FID and
    plot FID and IS. The model is loaded once for every scale."""
    from . import sample_many
    from .train import distributed, process_device

    if args.samples is not None or args.ckpt is None:
        raise UsageError("--cfg-sweep samples --ckpt itself: pass --ckpt and no SAMPLES.npz")
    values = parse_sweep(args.cfg_sweep)
    out = _json_out(args.out or "cfg_sweep.json")
    folder = os.path.splitext(out)[0]
    _pyplot()
    ref = read_reference(args.ref)
    if args.features != DIGITS:  # missing weights are found before any sampling
        from .inception import weights_path
        weights_path(args.inception_weights)
    runs = []
    for value in values:
        many = copy.copy(args)
        many.cfg = value
        many.out = os.path.join(folder, f"cfg-{value:g}.npz")
        if args.overwrite or not os.path.exists(many.out):  # a finished scale is kept
            sample_many.check(many)
        runs.append(many)
    rank, world = distributed(args.device)
    loaded = sample_many.load(args, process_device(args.device, rank, world))
    settings = sample_many.settings(runs[0], *loaded[:3])
    del settings["cfg"]
    held = sample_many.prepare(args, folder, settings, rank, "samples", "evaluate --cfg-sweep")
    try:
        if world > 1:  # no process looks for a finished scale before the folder is ready
            import torch.distributed as dist
            dist.barrier()
        for many in runs:
            if not os.path.exists(many.out):
                sample_many.run(many, loaded)
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()
            if rank:
                return None
        return _score_sweep(args, values, runs, ref, settings, out, folder)
    finally:
        if held is not None:
            held.close()


def _score_sweep(args, values, runs, ref, settings, out, folder):
    net, results, ref_features = feature_network(args), [], {}
    for value, many in zip(values, runs):
        images = read_samples(many.out)
        check_pair(images.shape, ref, args.features)
        results.append({"cfg": value, "samples": many.out,
                        **score(images, ref, net, args.features, ref_features)})
        print(f"cfg {value:g}: {_line(results[-1])}")
    best = min(results, key=lambda r: r["fid"])
    plot = folder + ".png"
    _plot(results, best, plot)
    with open(out, "w") as f:
        json.dump({"ref": args.ref, "features": args.features, "settings": settings,
                   "best": best, "results": results}, f, indent=2)
    print(f"best cfg {best['cfg']:g}: FID {best['fid']:.4g}; wrote {out} and {plot}")
    return best


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--cfg-sweep plots with matplotlib: pip install matplotlib "
                         "(make test installs it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot(results, best, path):
    plt = _pyplot()
    cfg = [r["cfg"] for r in results]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(cfg, [r["fid"] for r in results], "o-", color="tab:blue")
    left.axvline(best["cfg"], color="tab:blue", ls=":", lw=1)
    left.set_xlabel("classifier-free guidance scale")
    left.set_ylabel("FID (lower is better)", color="tab:blue")
    right = left.twinx()
    right.plot(cfg, [r["inception_score"] for r in results], "s--", color="tab:red")
    right.set_ylabel("Inception Score", color="tab:red")
    left.set_title(f"best FID {best['fid']:.3g} at cfg {best['cfg']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
