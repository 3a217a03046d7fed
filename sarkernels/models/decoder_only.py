"""The decoder-only stack RandAR and RAR share (LlamaGen's GPT), its config, and their
generation loop.

Every sequence slot attends causally by slot index; 2D RoPE uses each slot's grid cell
(the class token's rotation is all zero, as in RandAR). A subclass says which slots a step
feeds (``_slots``), how they are embedded (``_feed``) and where the cache resumes after a
step (``_resume_slot``).
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import Block, Rope
from ..rope import CLASS_TOKEN
from . import condition
from .config import Config, Configured
from .generation import Generation, Step, pick


@dataclass(kw_only=True)
class DecoderOnlyConfig(Config):
    """The :class:`RandARTransformer` arguments (and those RAR shares):
    :class:`~.config.Config`'s, the depth and the dropout on token embeddings."""
    PRESETS: ClassVar[dict] = {  # LlamaGen GPT sizes
        "B": dict(dim=768, n_layer=12, n_head=12),
        "L": dict(dim=1024, n_layer=24, n_head=16),
        "XL": dict(dim=1280, n_layer=36, n_head=20),
        "XXL": dict(dim=1536, n_layer=48, n_head=24),
    }
    n_layer: int = 24
    token_dropout: float = 0.1


class CausalSlots:
    """What the decoder-only models share around their layers: the loss under a training
    layout and the generation schedule, from a model's ``_slots(start, decoded, n)`` (the
    slots a step feeds, their order indices, instruction flags), ``_resume_slot(decoded)``
    (where the cache resumes after a step) and ``_max_slots(n_tokens)``."""

    def loss(self, tokens, labels, layout=None, generator=None):
        """Mean cross-entropy of every token under a training ``layout`` (see
        :meth:`training_layout`; drawn from ``generator`` when None); ``labels`` class labels
        or a :class:`~sarkernels.models.condition.Prompt` (a model built with ``cond_dim``)."""
        layout = self.training_layout(len(tokens), generator) if layout is None else layout
        order = layout["order"].to(tokens.device)
        logits = self(tokens, condition.prefix(self, labels, layout["drop_label"]), order)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.gather(1, order).flatten())

    def _new_caches(self, batch, n_tokens=None, prefix_len=1):
        slots = self._max_slots(self.n_tokens if n_tokens is None else n_tokens)
        return {"layers": self._kv_caches(batch, slots + prefix_len - 1, self.config.n_layer)}

    def _schedule(self, plan, use_kv_cache, prefix_len=1, n_tokens=None):
        """Per step ``feed [3, L]`` (slot, order index or -1 for the class token (-Lc .. -2
        for the prefix's other rows), 1 for an instruction) and ``targets [n]``; the last n
        fed slots are the queries."""
        steps, start, decoded = [], 0, plan.num_known
        extra = condition.extra_entries(prefix_len - 1, self._max_slots(n_tokens or self.n_tokens))
        for n in plan.sizes:
            slots, index, instruction = self._slots(start, decoded, n)
            if start == 0:
                slots, index = extra[0] + slots, extra[1] + index
                instruction = [False] * len(extra[0]) + instruction
            feed = torch.tensor([slots, index, instruction])
            steps.append(Step((feed, torch.arange(decoded, decoded + n)), decoded, n))
            start = self._resume_slot(decoded) if use_kv_cache else 0
            decoded += n
        return steps


class DecoderOnly(CausalSlots, Generation, Configured, nn.Module):
    """Built from a ``config_class`` config (or its fields as keywords); a subclass adds its
    parameters, then calls ``_init``."""
    config_class = DecoderOnlyConfig

    def __init__(self, config=None, /, **fields):
        super().__init__()
        cfg = self._configure(config, fields)
        self.token_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(Block(cfg.dim, cfg.n_head, cfg.n_kv_head, dropout=cfg.dropout,
                                          multiple_of=cfg.multiple_of) for _ in range(cfg.n_layer))
        self._head()

    @classmethod
    def for_training(cls, *, layers, dropout, **config):
        """The model a training run builds: ``layers`` blocks, ``dropout`` on tokens and in
        the blocks; ``config`` the other config fields."""
        return cls(n_layer=layers, token_dropout=dropout, dropout=dropout, **config)

    def trunk(self, x, cells, slots=None, caches=None, angles=None, sets=None):
        """Causal (by slot) layers over the sequence slots ``slots [L]`` (default 0 .. L-1),
        RoPE by ``cells`` of the model's grid or rows of an ``angles`` table; returns the
        normed states. ``sets [B, L]`` (default: the slots) overrides the causal order."""
        b, length, _ = x.shape
        slots = torch.arange(length, device=x.device) if slots is None else slots
        sets = slots.expand(b, length) if sets is None else sets
        rope = Rope(self.grid_size, cells) if angles is None else Rope(None, cells, angles=angles)
        for i, layer in enumerate(self.layers):
            x = layer(x, sets, rope=rope, cache=None if caches is None else caches[i],
                      cache_slots=slots)
        return self.norm(x)

    def _prefixed(self, prefix, seq, cells):
        """The trunk over ``seq [B, Lc + L, D]`` (the prefix's rows first) in the training
        layout: ``cells [B, L]`` after the prefix's; set ids causal after the prefix's."""
        c = prefix.length
        cells = torch.cat([cells.new_full((cells.shape[0], c), CLASS_TOKEN), cells], 1)
        later = torch.arange(1, seq.shape[1] - c + 1, device=seq.device)
        return self.trunk(seq, cells, sets=torch.cat([prefix.sets, later.expand(len(seq), -1)], 1))

    def _step(self, state, sampling, feed, targets, noise):
        slots, index, instruction = feed.unbind(0)
        x, cells = self._feed(state, slots, index, instruction.bool())
        sets = torch.where(index < 0, condition.sets_at(state, index), slots)
        h = self.trunk(x, cells, slots, None if state.caches is None else state.caches["layers"],
                       state.angles, sets)
        return pick(self, state, sampling, h[:, -targets.shape[0]:], targets, noise)
