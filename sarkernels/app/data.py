"""Token datasets and tokenizers. The default is embedded real data: scikit-learn's
handwritten digits (1,797 8x8 images, 10 classes), one token per pixel intensity level.

A tokenizer has ``name``, ``vocab_size``, ``grid_size``, ``encode(images) -> [B, N]``,
``decode(tokens) -> images`` in [0, 1] ``[B, C, H, W]`` and ``config()`` (enough to rebuild
it with :func:`tokenizer_from_config`); a VQ tokenizer can stand in for it.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LEVELS = 17  # the digits' pixel intensities are integers 0..16


class DigitsTokenizer:
    """Pixel intensity level (0..16) as the token; ``grid=16`` upsamples 8x8 images
    bilinearly and re-quantises to the same 17 levels (256 tokens, ImageNet-VQ length)."""

    name = "digits"
    vocab_size = LEVELS

    def __init__(self, grid=8):
        if grid not in (8, 16):
            raise ValueError(f"digits grid must be 8 or 16, got {grid}")
        self.grid_size = grid

    def encode(self, images):
        """``images [B, 8, 8]`` with values in 0..16 -> tokens ``[B, grid * grid]``."""
        x = torch.as_tensor(images, dtype=torch.float32)
        if self.grid_size != 8:
            x = F.interpolate(x[:, None], size=(self.grid_size,) * 2, mode="bilinear",
                              align_corners=False)[:, 0]
        return x.round().clamp(0, LEVELS - 1).long().flatten(1)

    def decode(self, tokens):
        """tokens -> grey images ``[B, 1, grid, grid]`` in [0, 1]."""
        return (tokens.float() / (LEVELS - 1)).view(-1, 1, self.grid_size, self.grid_size)

    def config(self):
        return {"name": self.name, "grid": self.grid_size}


def tokenizer_from_config(config):
    if config.get("name") == "digits":
        return DigitsTokenizer(config["grid"])
    if config.get("name") == "vq":
        from ..tokenizers import VQHandle
        return VQHandle(config)
    raise ValueError(f"unknown tokenizer {config.get('name')!r}")


@dataclass
class TokenDataset:
    """Token sequences ``[M, N]`` with class labels ``[M]`` and the tokenizer behind them."""
    tokens: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    tokenizer: object

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
    tok = DigitsTokenizer(grid)
    images = torch.as_tensor(data.images, dtype=torch.float32)[index]
    return TokenDataset(tok.encode(images), torch.as_tensor(data.target)[index].long(), 10, tok)


def load(name, grid=8, split="train"):
    """``"digits"``, or a token folder written by ``python -m sarkernels tokenize``."""
    if os.path.isfile(os.path.join(name, "meta.json")):
        if split != "train":
            raise ValueError(f"token folder {name!r} has only a training split")
        from .tokenize import load_token_folder
        return load_token_folder(name)
    if name != "digits":
        raise ValueError(f"unknown dataset {name!r} (use digits or a token folder from "
                         "'python -m sarkernels tokenize')")
    return digits(grid, split)
