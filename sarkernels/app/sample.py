"""The ``sample`` command: sampling recipes, labelled PNG grids, and known cells from an
image and a mask."""
import contextlib
import os

import torch

from ..tokenizers.digits import grey
from . import prompts
from .cli_args import UsageError

# Every picture of a grid is generated in one batch, so a typo in --n must not reach the
# allocator: 1024 pictures of 256x256 VQ output are 0.8 GB of float pixels alone.
MAX_PICTURES = 1024
# Extrapolation decodes one token per step, each attending to all before it: a 64x64 grid
# (4096 tokens: 8x the digits, 4x ImageNet's 16x16) took 3 minutes for one picture of a
# tiny digits RandAR on two CPU cores, and the time grows faster than the token count.
MAX_SIDE = 64

# name -> (models it applies to, generate() keywords, description)
RECIPES = {
    "ar": (("sar", "randar", "rar", "rar-official"), dict(order="raster", schedule="ar"),
           "AR: raster order, one token per step"),
    "sar-ts": (("sar",), dict(order="random", schedule="random", steps=16),
               "SAR-TS: random order, 16 sets of random sizes"),
    "mar": (("sar",), dict(order="random", schedule="cosine", steps=4),
            "MAR-like: random order, 4 sets (cosine)"),
    "randar-parallel": (("randar",), dict(order="random", schedule="randar"),
                        "RandAR parallel decoding: random order, RandAR schedule"),
    "randar-ar": (("randar",), dict(order="random", schedule="ar"),
                  "RandAR: random order, one token per step"),
}


def recipe(name, kind=None):
    """generate() keywords of recipe ``name`` for a model of ``kind`` (any kind: None)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    kinds, kw, _ = RECIPES[name]
    if kind is not None and kind not in kinds:
        raise ValueError(f"recipe {name!r} is for {'/'.join(kinds)} models, not {kind}")
    return dict(kw)


def parse_labels(text):
    """``"3,1,4"`` -> ``[3, 1, 4]``; a ValueError naming --labels for anything else."""
    example = "give comma-separated class indices such as 0,1,2"
    if not str(text).strip():
        raise ValueError(f"--labels is empty: {example}")
    items = str(text).split(",")
    if not all(x.strip() for x in items):
        raise ValueError(f"--labels {text!r} has an empty item: {example}")
    try:
        return [int(x) for x in items]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers, got {text!r}") from None


def parse_resolution(text):
    """``"2x"`` -> 2: the scale of the grid side for resolution extrapolation (an integer
    of 2 or more); a ValueError naming --resolution for anything else."""
    digits = str(text).strip().lower().removesuffix("x")
    if not digits.isdigit() or int(digits) < 2:
        raise ValueError(f"--resolution must be an integer scale of 2 or more followed by x, "
                         f"such as 2x (twice the trained grid side), got {text!r}")
    return int(digits)


def check_labels(labels, num_classes):
    """The labels as a tensor, each a class of the model."""
    if min(labels) < 0 or max(labels) >= num_classes:
        raise ValueError(f"--labels must be in [0, {num_classes}), got "
                         f"{','.join(map(str, labels))}")
    return torch.tensor(labels)


def image_grid(rows, path, row_titles=None, col_titles=None, cell=48):
    """Writes a PNG of images ``rows[r][c]`` (``[C, H, W]`` in [0, 1]; one channel is
    digit ink, drawn dark on white; three are RGB), with titles."""
    from PIL import Image, ImageDraw

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    cell = max(cell, rows[0][0].shape[-1])
    left = 8 + 7 * max((len(t) for t in row_titles or []), default=0)
    top = 18 if col_titles else 0
    pad = 4
    canvas = Image.new("RGB", (left + n_cols * (cell + pad), top + n_rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = top + r * (cell + pad)
        if row_titles:
            draw.text((4, y + cell // 2 - 6), row_titles[r], fill="black")
        for c, img in enumerate(row):
            pixels = (img.clamp(0, 1) * 255).round().byte()
            tile = Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB") if len(pixels) == 3 \
                else Image.fromarray(255 - pixels[0].numpy()).convert("RGB")
            canvas.paste(tile.resize((cell, cell), Image.NEAREST), (left + c * (cell + pad), y))
    for c, title in enumerate(col_titles or []):
        draw.text((left + c * (cell + pad) + cell // 2 - 3, 3), str(title), fill="black")
    canvas.save(path)


HALVES = ("left", "right", "top", "bottom")


def half_mask(name, grid):
    """Cells to keep for ``left``/``right``/``top``/``bottom`` (the rest is generated)."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    keep = dict(zip(HALVES, (c < grid // 2, c >= grid // 2, r < grid // 2, r >= grid // 2)))
    return keep[name].flatten()


def check_mask(mask):
    """A half name or an existing mask image file, or a ValueError saying which it must be."""
    if mask not in HALVES and not os.path.isfile(mask):
        raise ValueError(f"--mask must be {', '.join(HALVES)} or a mask image file; {mask!r} "
                         "is neither")
    return mask


def open_picture(path):
    """The picture file at ``path`` (PIL), or a ValueError saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        picture = Image.open(path)
        picture.load()
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path!r}: {exc}") from None
    return picture


def load_grey(path, grid):
    """An image file as ``[grid, grid]`` intensities in [0, 1] (ink bright, like the data)."""
    return grey(open_picture(path), grid)


def save_grey(pixels, path):
    """``[H, W]`` intensities in [0, 1] as a greyscale PNG that :func:`load_grey` reads back
    exactly at the same size (bright ink on black, like the data)."""
    from PIL import Image

    Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().numpy(), "L").save(path)


def image_tokens(image_path, tokenizer, invert=False):
    """An image file through the tokenizer: ``[N]`` tokens. ``invert`` reads dark ink on
    light paper as the digits look (bright on black)."""
    images = tokenizer.from_pil([open_picture(image_path)])
    return tokenizer.encode((1 - images) if invert else images)[0]


def known_from_image(image_path, mask, tokenizer, invert=False):
    """``(positions, tokens)`` of the cells to keep from an image. ``mask`` is a half name
    or a mask image (bright = keep). ``invert`` for dark ink on a light background (digits)."""
    tokens = image_tokens(image_path, tokenizer, invert)
    grid = tokenizer.grid_size
    keep = half_mask(mask, grid) if check_mask(mask) in HALVES else \
        (load_grey(mask, grid) > 0.5).flatten()
    if keep.all() or not keep.any():
        raise ValueError("the mask must keep some cells and leave some to generate")
    positions = keep.nonzero().flatten()
    return positions, tokens[positions]


def official(args):
    """``--ckpt`` names official RandAR/RAR weights rather than a sarkernels checkpoint."""
    return (os.path.isfile(args.ckpt) and args.ckpt.endswith((".safetensors", ".bin"))
            and not os.path.isfile(os.path.join(os.path.dirname(args.ckpt), "config.json")))


def check(args):
    """Everything about a sample command that can be checked before loading a model."""
    from . import outputs

    columns = len(parse_labels(args.labels))
    if args.prompts is not None:
        columns = len(prompts.parse(args.prompts))
        if args.resolution is not None or official(args):
            raise UsageError("--prompts samples a checkpoint trained with --condition prompts "
                             "on its own grid: it does not combine with --resolution or "
                             "official weights")
    if args.n * columns > MAX_PICTURES:
        raise UsageError(f"--n {args.n} rows of {columns} columns are {args.n * columns} "
                         f"pictures; a grid holds at most {MAX_PICTURES}, generated as one "
                         "batch: lower --n, or sample again with another --seed")
    if args.resolution is not None:
        parse_resolution(args.resolution)
        if args.image is not None or args.mask is not None or args.recipe is not None:
            raise UsageError("--resolution extrapolates freshly generated samples: it does "
                             "not combine with --image, --mask or --recipe")
        if args.cfg_power is not None:
            raise UsageError("--resolution guides as RandAR's extrapolation does (a linear "
                             "ramp, then constant --cfg and --spatial-cfg): it does not take "
                             "--cfg-power")
        if args.spatial_cfg < 0:
            raise UsageError(f"--spatial-cfg must be >= 0, got {args.spatial_cfg}")
        if args.ntk_boundary < 0:
            raise UsageError(f"--ntk-boundary must be >= 0, got {args.ntk_boundary}")
    if args.mask is not None and args.image is None:
        raise UsageError("--mask says which cells of --image to keep: pass --image too")
    if args.image is not None:
        if not os.path.isfile(args.image):
            raise UsageError(f"cannot read image {args.image!r} (--image): no such file")
        check_mask(args.mask or "left")
    check_source(args)
    outputs.picture(args.out)


def check_source(args):
    """The model, recipe, sampling and device options that ``sample`` and ``sample-many``
    share, checked before loading a model."""
    from ..models import DecoderOnlyConfig
    from ..models.common import check_sampling
    from .train import check_device

    if args.recipe is not None:
        recipe(args.recipe)
    check_sampling(args.temperature, args.top_k, args.top_p, args.cfg, cfg_power=args.cfg_power)
    check_device(args.device)
    if official(args):
        if args.vq is None:
            raise UsageError(f"{args.ckpt} holds official weights that make VQ codes: pass --vq "
                             "to decode them into pictures")
        if args.model == "randar" and args.heads is None and \
                args.preset not in DecoderOnlyConfig.PRESETS:
            raise UsageError(f"unknown --preset {args.preset!r}; choose from "
                             f"{', '.join(DecoderOnlyConfig.PRESETS)}")


def run(args):
    """The ``sample`` command: a PNG grid of pictures (or an inpainting) from a checkpoint."""
    check(args)
    from . import checkpoint

    model, config, path, tok = load(args)
    if checkpoint.condition_kind(config) == "prompts" or args.prompts is not None:
        return from_prompts(args, model, config, path, tok)
    labels = check_labels(parse_labels(args.labels), config["num_classes"])
    if args.resolution is not None:
        return extrapolate(args, model, config, path, tok, labels)
    name = recipe_name(args, config["model"])
    kw = recipe(name, config["model"])
    if args.image:
        kw["known"] = known_from_image(args.image, args.mask or "left", tok, args.invert)
    images = generate_grid(args, model, tok, labels.repeat(args.n).to(args.device), kw)
    rows = [list(r) for r in images]
    titles = [f"sample {i}" for i in range(args.n)]
    if args.image:
        known = torch.zeros(tok.grid_size ** 2, dtype=torch.long)
        known[kw["known"][0]] = kw["known"][1]
        kept = tok.decode(known[None].to(args.device)).cpu()[0]
        rows.insert(0, [kept] * len(labels))
        titles.insert(0, "kept cells")
    image_grid(rows, args.out, row_titles=titles, col_titles=labels.tolist())
    print(f"wrote {args.out}: {name} from {path}")


def load(args, device=None):
    """``(model, config, path, tokenizer)`` that ``--ckpt`` (with ``--vq`` and the official
    options) names, on ``device`` (default ``--device``)."""
    from . import checkpoint
    from ..models import DecoderOnlyConfig
    from ..tokenizers import from_config, load_vq

    device = device or args.device
    vq = load_vq(args.vq, args.image_size).to(device) if args.vq else None
    if official(args):
        heads = args.heads  # RAR's own tensors say how many
        if args.model == "randar":
            heads = heads or DecoderOnlyConfig.PRESETS[args.preset]["n_head"]
        model = checkpoint.load_official(args.ckpt, args.model, heads, vq.grid_size, device)
        if model.vocab_size != vq.vocab_size:
            raise UsageError(f"{args.ckpt} makes codes of a {model.vocab_size}-code vocabulary but "
                             f"--vq {args.vq} has {vq.vocab_size} codes: pass the tokenizer the "
                             "weights were trained on")
        return model, {"model": args.model, "num_classes": model.num_classes}, args.ckpt, vq
    model, config, path = checkpoint.load(args.ckpt, device)
    return model, config, path, vq or from_config(config["tokenizer"])


def recipe_name(args, kind):
    return args.recipe or {"sar": "sar-ts", "randar": "randar-parallel"}.get(kind, "ar")


def generate_grid(args, model, tok, cond, kw):
    """Pictures ``[n, columns, C, H, W]`` for the condition of ``n`` rows of columns."""
    images = generate(args, model, tok, cond, kw, torch.Generator().manual_seed(args.seed))
    return images.view(args.n, len(images) // args.n, *images.shape[1:])


def generate(args, model, tok, cond, kw, generator, autocast=None):
    """Pictures ``[B, C, H, W]`` in [0, 1] on the CPU for ``B`` conditions, with the sampling
    options of ``args``; ``autocast`` (a dtype) runs the model, not the decoder, in it."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, autocast) if autocast else contextlib.nullcontext():
        tokens = model.generate(cond, cfg_scale=args.cfg, cfg_power=args.cfg_power,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                generator=generator, **kw)
    return tok.decode(tokens.to(device)).cpu()


def from_prompts(args, model, config, path, tok):
    """``sample --prompts``: a column per prompt (numbered; the legend is printed)."""
    from . import checkpoint

    if checkpoint.condition_kind(config) != "prompts":
        raise UsageError(f"--prompts needs a checkpoint trained with --condition prompts; "
                         f"{path} is conditioned on class labels: pass --labels")
    if args.prompts is None:
        raise UsageError(f"{path} is conditioned on text prompts: pass --prompts, such as "
                         "--prompts 'a handwritten seven,the digit 2'")
    if args.image:
        raise UsageError("--prompts does not combine with --image")
    texts = prompts.parse(args.prompts)
    cond = prompts.TextEncoder()(texts * args.n)
    name = recipe_name(args, config["model"])
    images = generate_grid(args, model, tok, cond, recipe(name, config["model"]))
    image_grid([list(r) for r in images], args.out,
               row_titles=[f"sample {i}" for i in range(args.n)], col_titles=range(len(texts)))
    legend = "; ".join(f"{i}: {t}" for i, t in enumerate(texts))
    print(f"wrote {args.out}: {name} from {path}; columns {legend}")


def extrapolate(args, model, config, path, tok, labels):
    """``sample --resolution Sx``: rows of trained-grid samples, each above its extrapolation."""
    if config["model"] != "randar":
        raise UsageError(f"--resolution needs a RandAR model (resolution extrapolation is "
                         f"RandAR's), but {path} holds a {config['model']} model")
    scale = parse_resolution(args.resolution)
    side = scale * model.grid_size
    if side > MAX_SIDE:
        raise UsageError(f"--resolution {args.resolution} makes {path}'s {model.grid_size}x"
                         f"{model.grid_size} tokens {side}x{side}; at most {MAX_SIDE}x{MAX_SIDE}, "
                         f"so at most {MAX_SIDE // model.grid_size}x for this model")
    quarter = model.config.dim // model.config.n_head // 4
    if args.ntk_boundary > quarter:
        raise UsageError(f"--ntk-boundary must be in [0, {quarter}] for {path}: its heads have "
                         f"{quarter} RoPE frequencies per axis ({quarter}: all extrapolated), "
                         f"got {args.ntk_boundary}")
    tokens = model.generate_extrapolated(
        labels.repeat(args.n).to(args.device), scale, cfg=3.0 if args.cfg is None else args.cfg,
        spatial_cfg=args.spatial_cfg, ntk_boundary=args.ntk_boundary,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed))
    low = tokens.view(-1, side, side)[:, ::scale, ::scale].flatten(1)  # stage 1's samples
    small = tok.decode(low).cpu()
    large = tok.decode(tokens, (side, side)).cpu()
    rows, titles = [], []
    for i in range(args.n):
        cols = slice(i * len(labels), (i + 1) * len(labels))
        rows += [list(small[cols]), list(large[cols])]
        titles += [f"sample {i}", f"{scale}x"]
    image_grid(rows, args.out, row_titles=titles, col_titles=labels.tolist(),
               cell=max(48, large.shape[-1]))
    print(f"wrote {args.out}: {model.grid_size}x{model.grid_size} samples and their {side}x{side} "
          f"extrapolations from {path}")
