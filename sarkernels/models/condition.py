"""What a model is conditioned on: a class label, or a prompt of text-encoder embeddings.

Either becomes a *prefix*: ``rows [B, Lc, D]`` in model width placed before the image
tokens, and their set ids ``sets [B, Lc]``. A class label is a prefix of one row. A prompt
(LlamaGen's text-to-image conditioning) is ``Lc`` rows projected by a small MLP; its real
tokens are in set 0, visible to every image token (and to each other), and its padding
tokens carry :data:`PADDING`, a set id no query reaches, so padding is hidden by the set
rule itself (no dense mask) and the same prompt padded differently gives the same logits.

The models keep the class token's slot: it holds the prefix's LAST row (RAR adds the first
target-aware embedding to it; its output predicts the first token), so prompts are
left-justified (real tokens last, in their order); the other ``Lc - 1`` rows take extra
sequence and cache slots after the image layout's.
"""
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.attention import UNWRITTEN
from . import common

#: Set id of a padding token: above every query's set id under both set rules.
PADDING = UNWRITTEN


@dataclass
class Prompt:
    """A batch of text-encoder outputs: ``embeddings [B, Lc, Dc]`` (float) and ``mask
    [B, Lc]`` (bool, True for a real token, False for padding anywhere in the row; None:
    every token real). Every row needs at least one real token."""
    embeddings: torch.Tensor
    mask: torch.Tensor = None

    def __len__(self):
        return self.embeddings.shape[0]


@dataclass
class Prefix:
    """Condition rows ``[B, Lc, D]`` and their set ids ``[B, Lc]`` (0 or :data:`PADDING`)."""
    rows: torch.Tensor
    sets: torch.Tensor

    @property
    def length(self):
        """``Lc``, the rows per sample."""
        return self.rows.shape[1]

    @staticmethod
    def cat(prefixes):
        return Prefix(torch.cat([p.rows for p in prefixes]), torch.cat([p.sets for p in prefixes]))


class ClassEmbedding(common.ClassEmbedding):
    """Class labels ``[B]`` as a one-row prefix; :meth:`drop` swaps in the null class."""

    def check(self, labels, device, values=True):
        if isinstance(labels, Prompt):
            raise TypeError("this model is conditioned on class labels (built without "
                            "cond_dim): pass labels [B], got a Prompt")
        return common.check_labels(labels, self.num_classes, values).to(device)

    def drop(self, labels, drop):
        return common.drop_labels(labels, drop, self.num_classes)

    def prefix(self, labels):
        rows = self(labels)
        return Prefix(rows, torch.zeros(rows.shape[:2], dtype=torch.long, device=rows.device))


class CaptionEmbedding(nn.Module):
    """LlamaGen's CaptionEmbedder: ``cap_proj`` (Linear, GELU(tanh), Linear) from the text
    encoder's width ``cond_dim`` to the model's, and a learned null token ``uncond_embedding``
    (in the encoder's space, so it is projected like a prompt) that :meth:`drop` puts in
    place of a prompt: a one-token prompt, for training's condition dropout and CFG."""

    def __init__(self, cond_dim, dim):
        super().__init__()
        self.cond_dim = cond_dim
        self.cap_proj = nn.Sequential(nn.Linear(cond_dim, dim), nn.GELU(approximate="tanh"),
                                      nn.Linear(dim, dim))
        self.uncond_embedding = nn.Parameter(torch.randn(cond_dim) / cond_dim ** 0.5)

    def check(self, prompt, device, values=True):
        """The prompt on ``device``, checked (``values``: also that every row keeps a real
        token, a host sync on CUDA), padding zeroed, left-justified."""
        if not isinstance(prompt, Prompt):
            raise TypeError(f"this model is conditioned on prompts (cond_dim={self.cond_dim}): "
                            f"pass a sarkernels.models.Prompt, got {type(prompt).__name__}")
        emb = torch.as_tensor(prompt.embeddings)
        if emb.dim() != 3 or emb.shape[2] != self.cond_dim or not emb.dtype.is_floating_point:
            raise ValueError(f"Prompt.embeddings must be float [B, Lc, Dc={self.cond_dim}], got "
                             f"{emb.dtype} {list(emb.shape)}")
        b, length, _ = emb.shape
        mask = torch.ones(b, length, dtype=torch.bool) if prompt.mask is None else \
            torch.as_tensor(prompt.mask)
        if mask.shape != (b, length) or mask.dtype != torch.bool:
            raise ValueError(f"Prompt.mask must be bool [B, Lc] = [{b}, {length}], got "
                             f"{mask.dtype} {list(mask.shape)}")
        emb, mask = emb.to(device), mask.to(device)
        if length == 0 or values and not mask.any(1).all():
            raise ValueError("Prompt.mask must keep at least one real token in every row")
        order = mask.long().argsort(dim=1, stable=True)  # padding first, real tokens in order
        emb = emb.gather(1, order[..., None].expand_as(emb))
        mask = mask.gather(1, order)
        return Prompt(emb.masked_fill(~mask[..., None], 0), mask)

    def drop(self, prompt, drop):
        """``prompt`` (checked) with the rows where ``drop [B]`` is True replaced by the null
        token."""
        drop = drop.to(prompt.mask.device)
        null_mask = torch.zeros_like(prompt.mask)
        null_mask[:, -1] = True
        null = torch.zeros_like(prompt.embeddings)
        null[:, -1] = self.uncond_embedding.to(null.dtype)
        return Prompt(torch.where(drop[:, None, None], null, prompt.embeddings),
                      torch.where(drop[:, None], null_mask, prompt.mask))

    def prefix(self, prompt):
        rows = self.cap_proj(prompt.embeddings.to(self.cap_proj[0].weight.dtype))
        return Prefix(rows, torch.where(prompt.mask, 0, PADDING))


def embedding(num_classes, dim, cond_dim=None):
    """The model's condition embedding: class labels, or prompts of width ``cond_dim``."""
    return ClassEmbedding(num_classes, dim) if cond_dim is None else CaptionEmbedding(cond_dim, dim)


def prefix(model, cond, drop=None):
    """The prefix ``cond`` gives (a :class:`Prefix` passes through); with ``drop [B]``
    (training's condition dropout) the null condition on the rows where it is True. The
    forward and loss path: shapes are checked, values (a host sync on CUDA every step) are
    left to :func:`guidance`, generation's entry."""
    if isinstance(cond, Prefix):
        return cond
    embed = model.cls_embedding
    cond = embed.check(cond, model.output.weight.device, values=False)
    return embed.prefix(cond if drop is None else embed.drop(cond, drop))


def guidance(model, cond, copies):
    """The prefix every generation step runs and the batch size: ``cond`` then, for each
    of ``copies - 1`` guidance branches, the null condition."""
    embed = model.cls_embedding
    cond = embed.check(cond, model.output.weight.device)
    null = embed.prefix(embed.drop(cond, torch.ones(len(cond), dtype=torch.bool)))
    return Prefix.cat([embed.prefix(cond)] + [null] * (copies - 1)), len(cond)


def _row(state, index):
    return index.clamp_max(-1) + state.cls.shape[1]


def rows_at(state, index):
    """Prefix rows ``[R, L, D]`` for the feed entries ``index [L]``: -1 is the class slot
    (the prefix's last row), ``-Lc .. -2`` its other rows; other entries get the last row
    (callers select with ``index < 0``)."""
    return state.cls[:, _row(state, index)]


def sets_at(state, index):
    """The set ids ``[R, L]`` of :func:`rows_at`'s rows."""
    return state.cls_sets[:, _row(state, index)]


def extra_entries(count, first_slot):
    """Feed entries of the prefix rows before the class slot: slots ``first_slot ..`` after
    the image layout's, indices ``-Lc .. -2`` (``Lc = count + 1``)."""
    return list(range(first_slot, first_slot + count)), list(range(-count - 1, -1))
