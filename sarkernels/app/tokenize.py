"""``python -m sarkernels tokenize``: an image folder (one subfolder per class) to a token
dataset folder: ``meta.json`` plus ``part-NNNNNN.safetensors`` chunks of tokens and labels.
Each chunk is written atomically and skipped when present, so an interrupted run resumes."""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import outputs
from .data import TokenDataset, tokenizer_from_config

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


def image_folder(root):
    """Class names (sorted subfolders) and ``[(path, class index)]``."""
    if not os.path.isdir(root):
        raise ValueError(f"--images {root!r} is not a folder")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(f"--images {root!r} has no images in class subfolders (ImageFolder layout)")
    return classes, files


def _parts(out):
    return sorted(p for p in os.listdir(out) if p.startswith("part-") and p.endswith(".safetensors"))


def _open(path):
    """The image at ``path`` fully read, or the reason it cannot be."""
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
        return image, None
    except Exception as exc:  # PIL raises many types for a bad file; any of them means skip it
        return None, f"{type(exc).__name__}: {exc}"


def skipped_images(out):
    """``[(path, reason)]`` of the images the finished chunks in ``out`` left out."""
    found = []
    for part in _parts(out):
        with safe_open(os.path.join(out, part), "pt") as f:
            found += json.loads((f.metadata() or {}).get("skipped", "[]"))
    return found


def tokenize_folder(images, vq, out, batch=32, flip=False, device="cpu", progress=True):
    """Tokenizes every readable image; an unreadable one is left out and recorded with its
    chunk (see :func:`skipped_images`), so a resumed run reports it too."""
    classes, files = image_folder(images)
    outputs.folder(out)
    meta = {"classes": classes, "num_classes": len(classes), "tokenizer": vq.config(),
            "images": len(files), "flip": flip, "batch": batch}
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) != meta:
                raise ValueError(f"{out!r} holds a tokenization with other settings; use a new --out")
    else:
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(meta_path + ".tmp", meta_path)
    vq = vq.to(device)
    chunks = range(0, len(files), batch)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="tokenize", unit="batch")
    size = vq.settings["image_size"]
    try:
        for start in chunks:
            part = os.path.join(out, f"part-{start // batch:06d}.safetensors")
            if os.path.exists(part):
                continue
            opened = [(_open(p), p, c) for p, c in files[start:start + batch]]
            readable = [(image, c) for (image, _), _, c in opened if image is not None]
            skipped = [(p, why) for (_, why), p, _ in opened if why is not None]
            labels = torch.tensor([c for _, c in readable], dtype=torch.long)
            if readable:
                x = vq.from_pil([image for image, _ in readable], size).to(device)
                tokens = vq.encode(x).cpu()
                if flip:
                    tokens = torch.cat([tokens, vq.encode(x.flip(-1)).cpu()])
                    labels = labels.repeat(2)
            else:
                tokens = torch.zeros(0, vq.grid_size ** 2, dtype=torch.long)
            save_file({"tokens": tokens.int(), "labels": labels.int()}, part + ".tmp",
                      metadata={"skipped": json.dumps(skipped)})
            os.replace(part + ".tmp", part)
    finally:  # an error or Ctrl-C is reported below the bar, not inside it
        if progress:
            chunks.close()
    return out


def load_token_folder(path):
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    parts = _parts(path)
    expected = -(-meta["images"] // meta["batch"])
    if len(parts) != expected:
        raise ValueError(f"token folder {path!r} is incomplete ({len(parts)}/{expected} parts): "
                         "run tokenize again to finish it")
    chunks = [load_file(os.path.join(path, p)) for p in parts]
    if not sum(len(c["labels"]) for c in chunks):
        raise ValueError(f"token folder {path!r} holds no images: none of its "
                         f"{meta['images']} could be read")
    return TokenDataset(torch.cat([c["tokens"] for c in chunks]).long(),
                        torch.cat([c["labels"] for c in chunks]).long(), meta["num_classes"],
                        tokenizer_from_config(meta["tokenizer"]))
