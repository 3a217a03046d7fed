"""Sampling recipes, labelled PNG grids, and known cells from an image and a mask."""
import os

import torch

# name -> (models it applies to, generate() keywords, description)
RECIPES = {
    "ar": (("sar", "randar", "rar"), dict(order="raster", schedule="ar"),
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


def load_grey(path, grid):
    """An image file as ``[grid, grid]`` intensities in [0, 1] (ink bright, like the data)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path).convert("L").resize((grid, grid), Image.BILINEAR)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path!r}: {exc}") from None
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.float().view(grid, grid) / 255


def save_grey(pixels, path):
    """``[H, W]`` intensities in [0, 1] as a greyscale PNG that :func:`load_grey` reads back
    exactly at the same size (bright ink on black, like the data)."""
    from PIL import Image

    Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().numpy(), "L").save(path)


def image_tokens(image_path, tokenizer, invert=False):
    """An image file through the tokenizer: ``[N]`` tokens."""
    if tokenizer.name == "digits":
        pixels = load_grey(image_path, 8)
        return tokenizer.encode(((1 - pixels) if invert else pixels)[None] * 16)[0]
    from PIL import Image, UnidentifiedImageError

    from .tokenizers import VQTokenizer
    try:
        image = Image.open(image_path)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {image_path!r}: {exc}") from None
    vq = tokenizer.model() if hasattr(tokenizer, "model") else tokenizer
    return vq.encode(VQTokenizer.from_pil([image], vq.settings["image_size"]))[0]


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
