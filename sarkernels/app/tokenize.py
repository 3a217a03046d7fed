"""``python -m sarkernels tokenize``: an image folder (one subfolder per class) to a token
folder (see :mod:`.data`). A chunk already present is skipped, so an interrupted run resumes."""
import os

import torch

from . import data, outputs

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


def _open(path):
    """The image at ``path`` fully read, or the reason it cannot be."""
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
        return image, None
    except Exception as exc:  # PIL raises many types for a bad file; any of them means skip it
        return None, f"{type(exc).__name__}: {exc}"


def tokenize_folder(images, vq, out, batch=32, flip=False, device="cpu", progress=True):
    """Tokenizes every readable image; an unreadable one is left out and recorded with its
    chunk (see :func:`data.skipped_images`), so a resumed run reports it too."""
    classes, files = image_folder(images)
    outputs.folder(out)
    meta = {"classes": classes, "num_classes": len(classes), "tokenizer": vq.config(),
            "images": len(files), "flip": flip, "batch": batch}
    data.start_token_folder(out, meta)
    vq = vq.to(device)
    chunks = range(0, len(files), batch)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="tokenize", unit="batch")
    try:
        for start in chunks:
            part = data.part_path(out, start // batch)
            if os.path.exists(part):
                continue
            opened = [(_open(p), p, c) for p, c in files[start:start + batch]]
            readable = [(image, c) for (image, _), _, c in opened if image is not None]
            skipped = [(p, why) for (_, why), p, _ in opened if why is not None]
            labels = torch.tensor([c for _, c in readable], dtype=torch.long)
            if readable:
                x = vq.from_pil([image for image, _ in readable]).to(device)
                tokens = vq.encode(x).cpu()
                if flip:
                    tokens = torch.cat([tokens, vq.encode(x.flip(-1)).cpu()])
                    labels = labels.repeat(2)
            else:
                tokens = torch.zeros(0, vq.grid_size ** 2, dtype=torch.long)
            data.write_part(part, tokens, labels, skipped)
    finally:  # an error or Ctrl-C is reported below the bar, not inside it
        if progress:
            chunks.close()
    return out
