"""Command line: ``python -m sarkernels info|train|sample|demo``.

Mistakes a user can make (paths, checkpoints, recipes, labels, arguments) end with one
``sarkernels: error: ...`` line and exit status 2, never a traceback.
"""
import argparse
import json
import os
import sys
from dataclasses import fields


def _train_parser(sub):
    from .train import TrainConfig

    p = sub.add_parser("train", help="train a SAR, RandAR or RAR model")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in ("rar_anneal",):
            continue
        kind = type(getattr(defaults, f.name))
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name),
                       **({"choices": ["sar", "randar", "rar"]} if f.name == "model" else {}),
                       **({"choices": [8, 16]} if f.name == "grid" else {}))
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--no-progress", action="store_true")


def _sample_parser(sub):
    from .sample import RECIPES

    p = sub.add_parser("sample", help="sample a checkpoint to a PNG grid")
    p.add_argument("--ckpt", required=True, help="a run folder or one of its step folders")
    p.add_argument("--recipe", default=None, help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--labels", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--n", type=int, default=1, help="samples per label (grid rows)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", help="inpaint/outpaint this image (keeps the --mask cells)")
    p.add_argument("--mask", default="left", help="left|right|top|bottom or a mask image (white = keep)")
    p.add_argument("--invert", action="store_true", help="the image has dark ink on light paper")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--model", choices=["randar", "rar"], default="randar",
                   help="architecture of an official .safetensors --ckpt")
    p.add_argument("--preset", default="L", help="official checkpoints: B, L, XL or XXL (heads)")
    p.add_argument("--heads", type=int, help="official checkpoints: override the preset's heads")
    p.add_argument("--vq", help="LlamaGen VQ checkpoint to decode codes into pictures")
    p.add_argument("--image-size", type=int, default=256, help="the VQ's image size")


def _tokenize_parser(sub):
    p = sub.add_parser("tokenize", help="turn an image folder (a subfolder per class) into tokens")
    p.add_argument("--images", required=True)
    p.add_argument("--vq", required=True, help="LlamaGen VQ checkpoint (.pt or .safetensors)")
    p.add_argument("--image-size", type=int, default=256, help="center-crop size (256 for VQ-16)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--flip", action="store_true", help="also add horizontally flipped copies")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")


def _demo_parser(sub):
    p = sub.add_parser("demo", help="train small SAR and RandAR models on digits, sample, report")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="a few training steps (for tests)")
    p.add_argument("--cfg", type=float, default=2.0)


def _sample(args):
    import torch

    from . import checkpoint, data, sample

    from .models.decoder_only import PRESETS
    from .tokenizers import VQTokenizer

    vq = VQTokenizer.from_checkpoint(args.vq, args.image_size).to(args.device) if args.vq else None
    if os.path.isfile(args.ckpt) and args.ckpt.endswith(".safetensors"):  # official weights
        if vq is None:
            raise ValueError("an official checkpoint makes VQ codes: pass --vq to decode them")
        if args.heads is None and args.preset not in PRESETS:
            raise ValueError(f"unknown --preset {args.preset!r}; choose from {list(PRESETS)}")
        heads = args.heads or PRESETS[args.preset]["n_head"]
        model = checkpoint.load_official(args.ckpt, args.model, heads, vq.grid_size, args.device)
        config, path, tok = {"model": args.model, "num_classes": model.num_classes}, args.ckpt, vq
    else:
        model, config, path = checkpoint.load(args.ckpt, args.device)
        tok = vq or data.tokenizer_from_config(config["tokenizer"])
    labels = sample.parse_labels(args.labels, config["num_classes"])
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    name = args.recipe or {"sar": "sar-ts", "randar": "randar-parallel", "rar": "ar"}[config["model"]]
    kw = sample.recipe(name, config["model"])
    if args.image:
        positions, values = sample.known_from_image(args.image, args.mask, tok, args.invert)
        kw["known"] = (positions, values)
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sarkernels")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="compiled backends, build details, and why one is unusable")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _train_parser(sub)
    _sample_parser(sub)
    _demo_parser(sub)
    _tokenize_parser(sub)
    args = parser.parse_args(argv)

    from .checkpoint import CheckpointError

    try:
        if args.command == "info":
            from .info import format_info, info
            d = info()
            print(json.dumps(d, indent=2) if args.json else format_info(d))
        elif args.command == "train":
            from .train import TrainConfig, train
            names = {f.name for f in fields(TrainConfig)}
            cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
            print(f"checkpoint: {train(cfg, resume=args.resume, progress=not args.no_progress)}")
        elif args.command == "sample":
            _sample(args)
        elif args.command == "tokenize":
            from .tokenize import tokenize_folder
            from .tokenizers import VQTokenizer
            vq = VQTokenizer.from_checkpoint(args.vq, args.image_size)
            out = tokenize_folder(args.images, vq, args.out, args.batch, args.flip, args.device,
                                  progress=not args.no_progress)
            print(f"wrote {out}; train on it with: python -m sarkernels train --data {out}")
        elif args.command == "demo":
            from . import demo
            report = demo.run(args.out, args.device, args.quick, args.cfg)
            best = max(report["recipes"], key=lambda r: r["class_accuracy"])
            print(f"wrote {args.out}/samples.png, inpainting.png, report.md, report.json; best "
                  f"recipe {best['model']}:{best['recipe']} at {best['class_accuracy']:.1%}")
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, CheckpointError) as exc:
        print(f"sarkernels: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sarkernels: interrupted (checkpoints on disk are complete)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
