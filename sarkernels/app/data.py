"""Token datasets: the embedded digits (scikit-learn's 1,797 handwritten 8x8 images, 10
classes, one token per pixel intensity level) and token folders.

A token folder (written by ``python -m sarkernels tokenize``) holds ``meta.json`` (classes,
image count, chunk size, the tokenizer's ``config()``) and ``part-NNNNNN.safetensors``
chunks of ``tokens`` and ``labels``, each with the images it left out in its metadata.
Every file is written under a temporary name and renamed, so a present chunk is complete.
"""
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import tokenizers
from ..tokenizers.digits import LEVELS


@dataclass
class TokenDataset:
    """Token sequences ``[M, N]`` with class labels ``[M]`` and the tokenizer behind them."""
    tokens: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    tokenizer: tokenizers.Tokenizer

    def __len__(self):
        return len(self.labels)


def digits(grid=8, split="train", held_out=360, seed=0):
    """The digits as a :class:`TokenDataset`; a fixed seeded split keeps ``held_out``
    images (balanced by chance, the same on every machine) out of ``"train"``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    perm = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(seed))
    index = perm[held_out:] if split == "train" else perm[:held_out]
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    tok = tokenizers.DigitsTokenizer(grid)
    images = torch.as_tensor(data.images, dtype=torch.float32)[index, None] / (LEVELS - 1)
    return TokenDataset(tok.encode(images), torch.as_tensor(data.target)[index].long(), 10, tok)


def load(name, grid=8, split="train"):
    """``"digits"``, or a token folder written by ``python -m sarkernels tokenize``."""
    if os.path.isfile(os.path.join(name, "meta.json")):
        if split != "train":
            raise ValueError(f"token folder {name!r} has only a training split")
        return load_token_folder(name)
    if name != "digits":
        raise ValueError(f"unknown dataset {name!r} (use digits or a token folder from "
                         "'python -m sarkernels tokenize')")
    return digits(grid, split)


def _parts(folder):
    return sorted(p for p in os.listdir(folder) if p.startswith("part-") and p.endswith(".safetensors"))


def part_path(folder, index):
    return os.path.join(folder, f"part-{index:06d}.safetensors")


def start_token_folder(folder, meta):
    """Writes ``meta.json``, or checks that the one there has the same settings (a resume)."""
    path = os.path.join(folder, "meta.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != meta:
                raise ValueError(f"{folder!r} holds a tokenization with other settings; use a new --out")
        return
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(path + ".tmp", path)


def write_part(path, tokens, labels, skipped):
    """One chunk, atomically; ``skipped`` lists ``(path, reason)`` of the images left out."""
    save_file({"tokens": tokens.int(), "labels": labels.int()}, path + ".tmp",
              metadata={"skipped": json.dumps(skipped)})
    os.replace(path + ".tmp", path)


def skipped_images(folder):
    """``[(path, reason)]`` of the images the finished chunks in ``folder`` left out."""
    found = []
    for part in _parts(folder):
        with safe_open(os.path.join(folder, part), "pt") as f:
            found += json.loads((f.metadata() or {}).get("skipped", "[]"))
    return found


def load_token_folder(path):
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        num_classes, images, batch = meta["num_classes"], meta["images"], meta["batch"]
        tokenizer = tokenizers.from_config(meta["tokenizer"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"token folder {path!r}: meta.json is corrupt ({exc})") from None
    parts = _parts(path)
    expected = -(-images // batch)
    if len(parts) != expected:
        raise ValueError(f"token folder {path!r} is incomplete ({len(parts)}/{expected} parts): "
                         "run tokenize again to finish it")
    chunks = [load_file(os.path.join(path, p)) for p in parts]
    if not sum(len(c["labels"]) for c in chunks):
        raise ValueError(f"token folder {path!r} holds no images: none of its "
                         f"{images} could be read")
    tokens = torch.cat([c["tokens"] for c in chunks]).long()
    labels = torch.cat([c["labels"] for c in chunks]).long()
    if tokens.dim() != 2 or tokens.shape[1] != tokenizer.grid_size ** 2:
        raise ValueError(f"token folder {path!r}: its tokens are {list(tokens.shape)}, not "
                         f"[images, {tokenizer.grid_size ** 2}] for its tokenizer's "
                         f"{tokenizer.grid_size}x{tokenizer.grid_size} grid")
    # out of range, a token fails deep in an embedding; a label == num_classes would
    # silently train as the null class that classifier-free guidance drops labels to
    _check_range(path, "token", tokens, tokenizer.vocab_size, "the vocabulary of its tokenizer")
    _check_range(path, "label", labels, num_classes, "num_classes in its meta.json")
    return TokenDataset(tokens, labels, num_classes, tokenizer)


def _check_range(path, what, values, count, source):
    bad = values[(values < 0) | (values >= count)]
    if len(bad):
        raise ValueError(f"token folder {path!r}: {what} {bad[0].item()} is outside [0, {count}) "
                         f"({count} from {source})")
