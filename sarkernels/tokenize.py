"""``python -m sarkernels tokenize``: an image folder (one subfolder per class) to a token
dataset folder: ``meta.json`` plus ``part-NNNNNN.safetensors`` chunks of tokens and labels.
Each chunk is written atomically and skipped when present, so an interrupted run resumes."""
import json
import os

import torch
from safetensors.torch import load_file, save_file

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


def tokenize_folder(images, vq, out, batch=32, flip=False, device="cpu", progress=True):
    from PIL import Image

    classes, files = image_folder(images)
    meta = {"classes": classes, "num_classes": len(classes), "tokenizer": vq.config(),
            "images": len(files), "flip": flip, "batch": batch}
    os.makedirs(out, exist_ok=True)
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
    for start in chunks:
        part = os.path.join(out, f"part-{start // batch:06d}.safetensors")
        if os.path.exists(part):
            continue
        chunk = files[start:start + batch]
        x = vq.from_pil([Image.open(p) for p, _ in chunk], size).to(device)
        labels = torch.tensor([c for _, c in chunk])
        tokens = vq.encode(x)
        if flip:
            tokens, labels = torch.cat([tokens, vq.encode(x.flip(-1))]), labels.repeat(2)
        save_file({"tokens": tokens.cpu().int(), "labels": labels.int()}, part + ".tmp")
        os.replace(part + ".tmp", part)
    return out


def load_token_folder(path):
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    parts = sorted(p for p in os.listdir(path) if p.startswith("part-") and p.endswith(".safetensors"))
    expected = -(-meta["images"] // meta["batch"])
    if len(parts) != expected:
        raise ValueError(f"token folder {path!r} is incomplete ({len(parts)}/{expected} parts): "
                         "run tokenize again to finish it")
    chunks = [load_file(os.path.join(path, p)) for p in parts]
    return TokenDataset(torch.cat([c["tokens"] for c in chunks]).long(),
                        torch.cat([c["labels"] for c in chunks]).long(), meta["num_classes"],
                        tokenizer_from_config(meta["tokenizer"]))
