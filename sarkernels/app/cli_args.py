"""What each ``python -m sarkernels`` command accepts: options with one-line help (default
and unit), descriptions and example commands. Parsing mistakes raise :class:`UsageError`,
which the command line prints as one ``sarkernels: error:`` line."""
import argparse
import math
import textwrap
from dataclasses import fields

EXAMPLES = {
    "info": """\
examples:
  python -m sarkernels info
  python -m sarkernels info --json""",
    "train": """\
examples:
  python -m sarkernels train --model sar --steps 1500 --out runs/sar
  python -m sarkernels train --model randar --condition prompts --out runs/text   # needs [text]
  python -m sarkernels train --model sar --sar-sets 4,8,16,32,64 --steps 1550 --out runs/sar64
  python -m sarkernels train --model randar --data digits --grid 16 --out runs/r16
  python -m sarkernels train --out runs/sar --resume                  # continues exactly
  python -m sarkernels train --out runs/sar --resume --steps 3000     # trains further
  torchrun --nproc_per_node 2 -m sarkernels train --model randar --out runs/r2
  python -m sarkernels train --model randar --data photos_tokens --dim 512 --layers 12 --heads 8 --out runs/photos""",
    "sample": """\
examples:
  python -m sarkernels sample --ckpt runs/sar --recipe sar-ts --labels 0,1,2 --n 4 --cfg 2 --out grid.png
  python -m sarkernels digit --label 3 --out digit.png    # a held-out digit to inpaint
  python -m sarkernels sample --ckpt runs/sar --image digit.png --mask left --out inpaint.png
  python -m sarkernels sample --ckpt runs/randar --resolution 2x --labels 0,1,2 --out big.png
  python -m sarkernels sample --model randar --ckpt RandAR-L.safetensors --preset L --vq vq_ds16_c2i.pt --labels 207,360,387 --cfg 4 --out grid.png
  python -m sarkernels sample --model rar --ckpt rar_xl.bin --vq maskgit-vqgan-imagenet-f16-256.bin --labels 207,360 --cfg 6.9 --temperature 1.02 --out rar.png
  python -m sarkernels sample --ckpt runs/photos --labels 0,1 --out photos.png
  python -m sarkernels sample --ckpt runs/text --prompts "a handwritten seven,the digit 2" --out text.png""",
    "sample-many": """\
examples:
  python -m sarkernels sample-many --ckpt runs/sar --per-class 20 --recipe mar --cfg 2 --out digits.npz
  python -m sarkernels sample-many --model randar --ckpt RandAR-L.safetensors --preset L --vq vq_ds16_c2i.pt --n 50000 --cfg 4 --batch 64 --device cuda --out randar_l.npz
  torchrun --nproc_per_node 8 -m sarkernels sample-many --ckpt runs/photos --per-class 50 --device cuda --out photos.npz""",
    "evaluate": """\
examples:
  python -m sarkernels evaluate digits.npz --ref digits --features digits
  python -m sarkernels evaluate randar_l.npz --ref VIRTUAL_imagenet256_labeled.npz --device cuda
  python -m sarkernels evaluate samples.npz --ref photos/ --inception-weights weights-inception-2015-12-05-6726825d.pth
  python -m sarkernels evaluate --cfg-sweep 1:3:0.5 --ckpt runs/sar --per-class 10 --recipe mar --ref digits --features digits""",
    "tokenize": """\
examples:
  python -m sarkernels tokenize --images photos/ --vq vq_ds16_c2i.pt --out photos_tokens --flip""",
    "demo": """\
examples:
  python -m sarkernels demo --out demo_out
  python -m sarkernels demo --quick --out /tmp/demo
  python -m sarkernels demo --prompts --out demo_out      # text-conditioned, needs [text]""",
    "digit": """\
examples:
  python -m sarkernels digit --label 3 --out digit.png
  python -m sarkernels sample --ckpt runs/sar --image digit.png --mask left --out inpaint.png""",
}


class UsageError(ValueError):
    """A command-line mistake: one line, exit status 2."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        help = action.help or ""
        unset = action.default in (None, argparse.SUPPRESS) or action.default is False
        if not unset and "(default" not in help:
            help += " (default: %(default)s)"
        return help


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_Formatter, **kwargs)

    def error(self, message):  # argparse's own mistakes get the same one line as ours
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _number(text):
    """A float option's value: Python reads 'inf' and 'nan' as floats, but no scale, rate
    or probability means them, and one would silently turn every weight or pixel into NaN."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _seed(text):
    """A seed torch's generators take: 64 bits, unsigned."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}")
    return value


def _command(sub, name, help, description=None):
    return sub.add_parser(name, help=help, description=textwrap.fill(description or help, 88),
                          epilog=EXAMPLES.get(name))


def _train_parser(sub):
    from ..models import MODELS
    from ..models.sar import TRAIN_SCHEDULES
    from .train import CONDITIONS, RESUMABLE, TrainConfig, option

    p = _command(sub, "train", "train a SAR, RandAR or RAR model, or continue one",
                 "Train a model into a run folder (--out): AdamW, warmup + cosine decay, atomic "
                 "checkpoints every --ckpt-every steps. Under torchrun every process trains on "
                 "its slice of the global --batch.")
    choices = {"model": list(MODELS), "grid": [8, 16], "sar_schedule": list(TRAIN_SCHEDULES),
               "condition": list(CONDITIONS)}
    for f in fields(TrainConfig):
        if "help" not in f.metadata:
            continue  # not a command-line setting
        kind = _number if isinstance(f.default, float) else type(f.default)
        # SUPPRESS: only the options given appear, so --resume can tell them from defaults
        p.add_argument(option(f.name), type=_seed if f.name == "seed" else kind,
                       default=argparse.SUPPRESS, choices=choices.get(f.name),
                       help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"))
    resumable = ", ".join(map(option, RESUMABLE))
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint, with its own "
                        f"settings; only {resumable} may differ")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that already holds a run (its checkpoints "
                        "are deleted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _checkpoint_options(p, required=True):
    """Where the model comes from: ``sample``, ``sample-many`` and ``evaluate --cfg-sweep``."""
    p.add_argument("--ckpt", required=required,
                   help="run folder (its newest checkpoint), step folder, or official weights "
                        "(.safetensors or .bin)" + ("" if required else " (--cfg-sweep only) "
                                                     "(default: none)"))
    p.add_argument("--model", choices=["randar", "rar"], default="randar",
                   help="official --ckpt only: RandAR (LlamaGen VQ codes) or RAR (rar_b.bin .. "
                        "rar_xxl.bin, MaskGIT VQGAN codes; its size is read from the weights)")
    p.add_argument("--preset", default="L",
                   help="official RandAR --ckpt only: B, L, XL or XXL (sets the heads)")
    p.add_argument("--heads", type=_positive,
                   help="official --ckpt only: attention heads (default: RandAR the --preset's, "
                        "RAR the weights')")
    p.add_argument("--vq", help="VQ checkpoint that decodes codes into pictures: LlamaGen's (.pt "
                                "or .safetensors) or MaskGIT's VQGAN (.bin or .safetensors) "
                                "(default: the one the run was tokenized with)")
    p.add_argument("--image-size", type=_positive, default=256,
                   help="--vq only: picture side, pixels")


def _sampling_options(p, cfg=True):
    """How tokens are drawn: ``sample``, ``sample-many`` and ``evaluate --cfg-sweep``."""
    from .sample import RECIPES

    p.add_argument("--recipe",
                   help="generation order and steps (default: sar-ts for SAR, randar-parallel "
                        "for RandAR, ar for RAR): "
                        + "; ".join(f"{k} = {v[2]}" for k, v in RECIPES.items()))
    if cfg:
        p.add_argument("--cfg", type=_number,
                       help="classifier-free guidance scale, >= 0 (default: none, no guidance)")
    p.add_argument("--cfg-power", type=_number,
                   help="the guidance scale's ramp over the decoded fraction f: 1 + (cfg - 1) * "
                        "(1 - cos(pi * f ** P)) / 2, the official RAR sampler's, for P >= 0 "
                        "(default: the model's; linear in f but for official RAR weights, "
                        "whose size gives the official README's power)")
    p.add_argument("--temperature", type=_number, default=1.0, help="softmax temperature, > 0")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=_number, default=1.0,
                   help="keep the likeliest tokens up to this probability mass, in (0, 1]")
    p.add_argument("--seed", type=_seed, default=0, help="random seed of the sampling")


def _sample_parser(sub):
    from .sample import HALVES

    p = _command(sub, "sample", "sample a checkpoint to a PNG grid (or inpaint an image)",
                 "Generate a grid of pictures, one column per label, from a run folder, a step "
                 "folder or official RandAR/RAR weights (.safetensors or .bin, with --vq).")
    _checkpoint_options(p)
    _sampling_options(p)
    p.add_argument("--labels", default="0,1,2,3,4,5,6,7,8,9",
                   help="comma-separated class indices, one grid column each")
    p.add_argument("--prompts",
                   help="a checkpoint trained with --condition prompts: comma-separated text "
                        "prompts, one grid column each, instead of --labels (needs the [text] "
                        "extra) (default: none)")
    p.add_argument("--n", type=_positive, default=1,
                   help="samples per label (grid rows); at most 1024 pictures in all, one batch")
    p.add_argument("--image", help="inpaint/outpaint this image: keep its --mask cells, generate "
                                   "the rest (digits: bright ink on black) (default: none)")
    p.add_argument("--mask", help=f"with --image: {', '.join(HALVES)} or a mask image "
                                  "(white = keep) (default: left)")
    p.add_argument("--invert", action="store_true",
                   help="with --image: the image has dark ink on light paper")
    p.add_argument("--resolution",
                   help="RandAR only: resolution extrapolation by this factor of the grid side, "
                        "such as 2x (8x8 digits -> 16x16 tokens), up to a 64x64 token grid (one "
                        "decoding step per token); each sample row is followed by its "
                        "extrapolation (default: none, the trained grid)")
    p.add_argument("--spatial-cfg", type=_number, default=2.5,
                   help="--resolution only: spatial guidance scale, >= 0 (--cfg, default 3 "
                        "there, is the class guidance)")
    p.add_argument("--ntk-boundary", type=int, default=2,
                   help="--resolution only: RoPE frequencies below this index (per axis, the "
                        "highest) use extrapolated integer positions, the rest interpolated ones")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", default="samples.png", help="PNG file to write")


def _many_options(p):
    """How many images and in what batches: ``sample-many`` and ``evaluate --cfg-sweep``."""
    p.add_argument("--n", type=_positive,
                   help="images, with labels drawn uniformly at random from --seed (RandAR's "
                        "protocol) (default: none; give --n or --per-class)")
    p.add_argument("--per-class", type=_positive,
                   help="exactly this many images of every class, in class order (RAR's "
                        "protocol: 50 for ImageNet's 50,000) (default: none)")
    p.add_argument("--batch", type=_positive, default=32,
                   help="images per batch and per shard; the images depend on it, not on the "
                        "number of processes")
    p.add_argument("--precision", choices=["bf16", "fp32"],
                   help="the model's arithmetic (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: one GPU a process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sample_many_parser(sub):
    p = _command(sub, "sample-many", "sample N images into one .npz for FID evaluation",
                 "Sample a checkpoint to N images in the ADM evaluation suite's format (one .npz: "
                 "arr_0 uint8 [N, H, W, 3], arr_1 the labels). Under torchrun every process "
                 "samples its share of the batches. Finished batches are kept as shards in "
                 "OUT's .parts folder: the same command continues an interrupted run.")
    _checkpoint_options(p)
    _sampling_options(p)
    _many_options(p)
    p.add_argument("--out", default="samples.npz", help=".npz file to write")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing --out and every shard in OUT.parts/ (whatever its "
                        "settings), then sample afresh")


def _evaluate_parser(sub):
    p = _command(sub, "evaluate", "FID, sFID, Inception Score, precision and recall of samples",
                 "Score a .npz of samples (arr_0 uint8 [N, H, W, 3]) against a reference: an "
                 "ADM reference batch (.npz with images and/or mu, sigma, mu_s, sigma_s), a "
                 "folder of images, or digits (the held-out digits). --cfg-sweep samples a "
                 "checkpoint at each guidance scale and scores each.")
    p.add_argument("samples", nargs="?",
                   help=".npz of samples, arr_0 uint8 [N, H, W, 3] (default: none, with --cfg-sweep)")
    p.add_argument("--ref", required=True,
                   help="reference: an ADM .npz (VIRTUAL_imagenet256_labeled.npz), a folder of "
                        "images, or digits (the 360 held-out digits)")
    p.add_argument("--features", choices=["inception", "digits"], default="inception",
                   help="feature network: the ADM suite's Inception-v3 (via torch-fidelity), or "
                        "the digits demo's judge")
    p.add_argument("--inception-weights",
                   help="torch-fidelity's Inception weights file, for machines without internet "
                        "(default: torch hub's checkpoints folder)")
    p.add_argument("--feature-batch", type=_positive, default=50,
                   help="images per pass of the feature network")
    p.add_argument("--out", help="JSON file of the results (default: SAMPLES with .json; "
                                 "--cfg-sweep: cfg_sweep.json, with cfg_sweep.png and the "
                                 "samples in cfg_sweep/)")
    g = p.add_argument_group("--cfg-sweep", "sample a checkpoint at each guidance scale and "
                                            "score each (the sampling options of sample-many)")
    g.add_argument("--cfg-sweep",
                   help="guidance scales: START:STOP:STEP (inclusive) or a comma-separated list "
                        "(default: none, score SAMPLES)")
    _checkpoint_options(g, required=False)
    _sampling_options(g, cfg=False)
    _many_options(g)
    g.add_argument("--overwrite", action="store_true",
                   help="delete OUT's samples folder (every scale's .npz and shards, whatever "
                        "their settings), then sample every scale afresh")


def _tokenize_parser(sub):
    p = _command(sub, "tokenize", "turn an image folder (a subfolder per class) into tokens",
                 "Center-crop every image of an ImageFolder (one subfolder per class), encode it "
                 "with a VQ (LlamaGen's or MaskGIT's), and write a token folder to train on. "
                 "Chunks are written atomically: an interrupted run continues where it stopped. "
                 "Unreadable images are left out and listed at the end.")
    p.add_argument("--images", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--vq", required=True, help="VQ checkpoint: LlamaGen's (.pt or .safetensors) "
                                               "or MaskGIT's VQGAN (.bin or .safetensors)")
    p.add_argument("--image-size", type=_positive, default=256,
                   help="center-crop side, pixels (256 for VQ-16)")
    p.add_argument("--out", required=True, help="token folder to write (meta.json, part-N files)")
    p.add_argument("--batch", type=_positive, default=32, help="images per chunk and VQ batch")
    p.add_argument("--flip", action="store_true", help="also add horizontally flipped copies")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _demo_parser(sub):
    p = _command(sub, "demo", "train small SAR and RandAR models on digits, sample, report",
                 "Train a small SAR and a small RandAR on the embedded digits (about five "
                 "minutes on two CPU cores), sample them with several recipes, and write "
                 "samples.png, inpainting.png, report.md and report.json.")
    p.add_argument("--out", default="demo_out", help="folder for pictures, reports and runs/")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="a few training steps per model: a smoke test, not a result")
    p.add_argument("--cfg", type=_number, default=2.0, help="classifier-free guidance scale, >= 0")
    p.add_argument("--prompts", action="store_true",
                   help="train both on text prompts instead of labels and report how often the "
                        "judge reads the digit the prompt names (needs the [text] extra); writes "
                        "prompt_samples.png, prompt_report.md and prompt_report.json")


def _digit_parser(sub):
    p = _command(sub, "digit", "write a held-out digit as a PNG (an image to inpaint)",
                 "Write one of the 360 held-out digits (never trained on) as an 8x8 greyscale "
                 "PNG, bright ink on black like the data: an image for sample --image.")
    p.add_argument("--label", type=int, required=True, help="which digit, 0 to 9")
    p.add_argument("--index", type=int, default=0, help="which held-out image of that digit, from 0")
    p.add_argument("--out", default="digit.png", help="PNG file to write")


def parser():
    parser = _Parser(prog="python -m sarkernels",
                     description="Set-autoregressive image generation: train, sample, "
                                 "sample-many, evaluate, tokenize, demo.\n'python -m sarkernels COMMAND --help' lists its options "
                                 "with defaults, and examples.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_info = _command(sub, "info", "compiled backends, build details, and why one is unusable")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _train_parser(sub)
    _sample_parser(sub)
    _sample_many_parser(sub)
    _evaluate_parser(sub)
    _tokenize_parser(sub)
    _demo_parser(sub)
    _digit_parser(sub)
    return parser


