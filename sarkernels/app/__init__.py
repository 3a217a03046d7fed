"""The application on top of the library: the ``python -m sarkernels`` commands (train,
sample, tokenize, demo, digit), checkpoints, datasets and token folders, and the digits
judge. The library (ops, reference, rope, nn, models, orders, tokenizers, info) never
imports from here."""
from . import blas  # noqa: F401  (before any matrix product of the process: see blas.py)
