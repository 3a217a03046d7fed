"""The command line, ``python -m sarkernels COMMAND`` for info, train, sample, sample-many,
evaluate, tokenize, demo and digit.

Every mistake (arguments, paths, devices, checkpoints, an existing run) ends with one
``sarkernels: error: ...`` line and exit status 2, found before any work where it can be
and never printed inside a progress bar. ``python -m sarkernels COMMAND --help`` lists
each option with its default and unit, and example commands (see cli_args.py).
"""
import importlib.util
import json
import signal
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
    from ..info import format_info, info

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


def _sample(args):
    _require("sample", "PIL")
    from . import sample

    sample.run(args)


def _sample_many(args):
    _require("sample-many", "PIL")
    from . import sample_many

    sample_many.run(args)


def _evaluate(args):
    _require("evaluate", "PIL", *(["sklearn"] if args.features == "digits" else []))
    from . import evaluate

    evaluate.run(args)


def _tokenize(args):
    _require("tokenize", "PIL")
    from . import outputs
    from .data import skipped_images
    from .tokenize import image_folder, tokenize_folder
    from ..tokenizers import load_vq
    from .train import check_device

    check_device(args.device)
    image_folder(args.images)
    outputs.folder(args.out)
    vq = load_vq(args.vq, args.image_size)
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

    if args.prompts:
        from . import prompt_demo

        report = prompt_demo.run(args.out, args.device, args.quick, args.cfg)
        best = max(report["results"], key=lambda r: r["accuracy"])
        print(f"wrote {args.out}/prompt_samples.png, prompt_report.md, prompt_report.json; best "
              f"{best['model']} on {best['prompts']} at {best['accuracy']:.1%}")
        return
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


COMMANDS = {"info": _info, "train": _train, "sample": _sample, "sample-many": _sample_many,
            "evaluate": _evaluate, "tokenize": _tokenize, "demo": _demo, "digit": _digit}


def _interrupted(args):
    """What an interrupt left behind, truthfully."""
    if args is None or args.command not in ("train", "tokenize", "sample-many"):
        return ""
    if args.command == "tokenize":
        return f"; finished chunks in {args.out} are kept: the same command continues"
    if args.command == "sample-many":
        from .sample_many import parts_folder

        return (f"; finished batches in {parts_folder(args.out)} are kept: the same command "
                "continues")
    from .checkpoint import newest
    from .train import TrainConfig

    out = getattr(args, "out", TrainConfig.out)
    step = newest(out)
    if step is None:
        return "; no checkpoint was written yet"
    return (f"; the newest checkpoint is {step}: continue with "
            f"python -m sarkernels train --out {out} --resume")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a batch system's time limit, torchrun stopping its workers), raised
    where Ctrl-C would be: the same cleanup of half-written files and the same message."""


def _terminate(signum, frame):
    raise Terminated


def main(argv=None):
    args = None
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        args = parser().parse_args(argv)
        COMMANDS[args.command](args)
    except (ValueError, OSError) as exc:  # the user's input or environment, never a bug's trace
        print(f"sarkernels: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"sarkernels: {what}{_interrupted(args)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)  # None: set outside Python
    return 0


if __name__ == "__main__":
    sys.exit(main())
