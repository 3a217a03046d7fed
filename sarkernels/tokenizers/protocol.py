"""The one interface of an image tokenizer: datasets, training and sampling use any
tokenizer through it and never ask which one they hold."""
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Tokenizer(Protocol):
    """Images <-> token grids, with images in one range on both sides.

    - ``encode(images) -> tokens``: float images ``[B, C, H, W]`` with values in [0, 1] to
      int64 tokens ``[B, grid_size ** 2]`` in ``[0, vocab_size)``, cell ``r * grid_size + c``.
    - ``decode(tokens, grid=None) -> images``: the way back, float ``[B, C, H, W]`` in
      [0, 1]; ``grid = (h, w)`` decodes another token grid than ``grid_size`` (a
      resolution-extrapolated sample).
    - ``from_pil(pictures) -> images``: PIL pictures as the images ``encode`` takes.
    - ``config()``: a JSON-able dict, stored with token folders and checkpoints, from which
      :func:`sarkernels.tokenizers.from_config` rebuilds the tokenizer; ``name`` says which.
    """

    name: str
    vocab_size: int
    grid_size: int

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor, grid: tuple | None = None) -> torch.Tensor: ...

    def from_pil(self, pictures: list) -> torch.Tensor: ...

    def config(self) -> dict: ...
