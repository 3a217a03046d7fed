"""Command line: ``python -m sarkernels info|train|sample|tokenize|demo|digit``.

Every mistake (arguments, paths, devices, checkpoints, an existing run) ends with one
``sarkernels: error: ...`` line and exit status 2, found before any work where it can be
and never printed inside a progress bar. ``python -m sarkernels COMMAND --help`` lists
each option with its default and unit, and example commands (see cli_args.py).
"""
import importlib.util
import json
import os
import sys
from dataclasses import fields

from .cli_args import UsageError, parser

# The application's packages beyond the dependencies, by import name: the [demo] extra.
EXTRA = {"sklearn": "scikit-learn", "scipy": "scipy", "PIL": "pillow"}


def _require(command, *modules):
    missing = [EXTRA[m] for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"'{command}' needs {', '.join(missing)}, which a plain install lacks: "
                         "pip install 'sarkernels[demo]'")


def _info(args):
    from .info import format_info, info

    d = info()
    print(json.dumps(d, indent=2) if args.json else format_info(d))


def _train(args):
    from .train import TrainConfig, resume_config, train

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    out = given.get("out", TrainConfig.out)
    cfg = resume_config(out, given) if args.resume else TrainConfig(**given)
    if cfg.data == "digits":
        _require("train --data digits", "sklearn")
    final = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"checkpoint: {final}")


def _official(args):
    """``--ckpt`` names official RandAR/RAR weights rather than a sarkernels checkpoint."""
    return (os.path.isfile(args.ckpt) and args.ckpt.endswith(".safetensors")
            and not os.path.isfile(os.path.join(os.path.dirname(args.ckpt), "config.json")))


def _check_sample(args):
    """Everything about a sample command that can be checked before loading a model."""
    from . import outputs, sample
    from .models.common import check_sampling
    from .models.decoder_only import PRESETS
    from .train import check_device

    sample.parse_labels(args.labels)
    if args.recipe is not None:
        sample.recipe(args.recipe)
    if args.resolution is not None:
        sample.parse_resolution(args.resolution)
        if args.image is not None or args.mask is not None or args.recipe is not None:
            raise UsageError("--resolution extrapolates freshly generated samples: it does "
                             "not combine with --image, --mask or --recipe")
        if args.spatial_cfg < 0:
            raise UsageError(f"--spatial-cfg must be >= 0, got {args.spatial_cfg}")
        if args.ntk_boundary < 0:
            raise UsageError(f"--ntk-boundary must be >= 0, got {args.ntk_boundary}")
    if args.mask is not None and args.image is None:
        raise UsageError("--mask says which cells of --image to keep: pass --image too")
    if args.image is not None:
        if not os.path.isfile(args.image):
            raise UsageError(f"cannot read image {args.image!r} (--image): no such file")
        sample.check_mask(args.mask or "left")
    check_sampling(args.temperature, args.top_k, args.top_p, args.cfg)
    check_device(args.device)
    outputs.picture(args.out)
    if _official(args):
        if args.vq is None:
            raise UsageError(f"{args.ckpt} holds official weights that make VQ codes: pass --vq "
                             "to decode them into pictures")
        if args.heads is None and args.preset not in PRESETS:
            raise UsageError(f"unknown --preset {args.preset!r}; choose from {', '.join(PRESETS)}")


def _sample(args):
    _require("sample", "PIL")
    _check_sample(args)
    import torch

    from . import checkpoint, data, sample
    from .models.decoder_only import PRESETS
    from .tokenizers import VQTokenizer

    vq = VQTokenizer.from_checkpoint(args.vq, args.image_size).to(args.device) if args.vq else None
    if _official(args):
        heads = args.heads or PRESETS[args.preset]["n_head"]
        model = checkpoint.load_official(args.ckpt, args.model, heads, vq.grid_size, args.device)
        config, path, tok = {"model": args.model, "num_classes": model.num_classes}, args.ckpt, vq
    else:
        model, config, path = checkpoint.load(args.ckpt, args.device)
        tok = vq or data.tokenizer_from_config(config["tokenizer"])
    labels = sample.check_labels(sample.parse_labels(args.labels), config["num_classes"])
    if args.resolution is not None:
        return _extrapolate(args, model, config, path, tok, labels)
    name = args.recipe or {"sar": "sar-ts", "randar": "randar-parallel", "rar": "ar"}[config["model"]]
    kw = sample.recipe(name, config["model"])
    if args.image:
        kw["known"] = sample.known_from_image(args.image, args.mask or "left", tok, args.invert)
    batch = labels.repeat(args.n)
    tokens = model.generate(batch.to(args.device), cfg_scale=args.cfg, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p,
                            generator=torch.Generator().manual_seed(args.seed), **kw).cpu()
    images = tok.decode(tokens.to(args.device)).cpu()
    images = images.view(args.n, len(labels), *images.shape[1:])
    rows = [list(r) for r in images]
    titles = [f"sample {i}" for i in range(args.n)]
    if args.image:
        known = torch.zeros(tok.grid_size ** 2, dtype=torch.long)
        known[kw["known"][0]] = kw["known"][1]
        kept = tok.decode(known[None].to(args.device)).cpu()[0]
        rows.insert(0, [kept] * len(labels))
        titles.insert(0, "kept cells")
    sample.image_grid(rows, args.out, row_titles=titles, col_titles=labels.tolist())
    print(f"wrote {args.out}: {name} from {path}")


def _extrapolate(args, model, config, path, tok, labels):
    """``sample --resolution Sx``: rows of trained-grid samples, each above its extrapolation."""
    import torch

    from . import sample

    if config["model"] != "randar":
        raise UsageError(f"--resolution needs a RandAR model (resolution extrapolation is "
                         f"RandAR's), but {path} holds a {config['model']} model")
    scale = sample.parse_resolution(args.resolution)
    tokens = model.generate_extrapolated(
        labels.repeat(args.n).to(args.device), scale, cfg=3.0 if args.cfg is None else args.cfg,
        spatial_cfg=args.spatial_cfg, ntk_boundary=args.ntk_boundary,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed))
    side = scale * model.grid_size
    low = tokens.view(-1, side, side)[:, ::scale, ::scale].flatten(1)  # stage 1's samples
    small = tok.decode(low).cpu()
    large = tok.decode(tokens, (side, side)).cpu()
    rows, titles = [], []
    for i in range(args.n):
        cols = slice(i * len(labels), (i + 1) * len(labels))
        rows += [list(small[cols]), list(large[cols])]
        titles += [f"sample {i}", f"{scale}x"]
    sample.image_grid(rows, args.out, row_titles=titles, col_titles=labels.tolist(),
                      cell=max(48, large.shape[-1]))
    print(f"wrote {args.out}: {model.grid_size}x{model.grid_size} samples and their {side}x{side} "
          f"extrapolations from {path}")


def _tokenize(args):
    _require("tokenize", "PIL")
    from . import outputs
    from .tokenize import image_folder, skipped_images, tokenize_folder
    from .tokenizers import VQTokenizer
    from .train import check_device

    check_device(args.device)
    image_folder(args.images)
    outputs.folder(args.out)
    vq = VQTokenizer.from_checkpoint(args.vq, args.image_size)
    out = tokenize_folder(args.images, vq, args.out, args.batch, args.flip, args.device,
                          progress=not args.no_progress)
    skipped = skipped_images(out)
    if skipped:
        listed = "; ".join(f"{path} ({why})" for path, why in skipped[:5])
        print(f"left out {len(skipped)} unreadable image(s): {listed}"
              + (" ..." if len(skipped) > 5 else ""), file=sys.stderr)
    print(f"wrote {out}; train on it with: python -m sarkernels train --data {out}")


def _demo(args):
    _require("demo", *EXTRA)
    from . import demo

    report = demo.run(args.out, args.device, args.quick, args.cfg)
    best = max(report["recipes"], key=lambda r: r["class_accuracy"])
    print(f"wrote {args.out}/samples.png, inpainting.png, report.md, report.json; best "
          f"recipe {best['model']}:{best['recipe']} at {best['class_accuracy']:.1%}")


def _digit(args):
    _require("digit", "sklearn", "PIL")
    from . import data, outputs, sample

    if not 0 <= args.label <= 9:
        raise UsageError(f"--label is a digit 0 to 9, got {args.label}")
    outputs.picture(args.out)
    held_out = data.digits(8, "held_out")
    index = (held_out.labels == args.label).nonzero().flatten()
    if not 0 <= args.index < len(index):
        raise UsageError(f"--index must be in [0, {len(index)}): the held-out set has "
                         f"{len(index)} images of a {args.label}")
    pixels = held_out.tokenizer.decode(held_out.tokens[index[args.index]][None])[0, 0]
    sample.save_grey(pixels, args.out)
    print(f"wrote {args.out}: held-out digit {args.label} #{args.index} (8x8, bright ink on black)")


COMMANDS = {"info": _info, "train": _train, "sample": _sample, "tokenize": _tokenize,
            "demo": _demo, "digit": _digit}


def _interrupted(args):
    """What an interrupt left behind, truthfully."""
    if args is None or args.command not in ("train", "tokenize"):
        return ""
    if args.command == "tokenize":
        return f"; finished chunks in {args.out} are kept: the same command continues"
    from .checkpoint import CheckpointError, resolve
    from .train import TrainConfig

    out = getattr(args, "out", TrainConfig.out)
    try:
        newest = resolve(out)
    except CheckpointError:
        return "; no checkpoint was written yet"
    return (f"; the newest checkpoint is {newest}: continue with "
            f"python -m sarkernels train --out {out} --resume")


def main(argv=None):
    args = None
    try:
        args = parser().parse_args(argv)
        COMMANDS[args.command](args)
    except (ValueError, OSError) as exc:  # the user's input or environment, never a bug's trace
        print(f"sarkernels: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sarkernels: interrupted{_interrupted(args)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
