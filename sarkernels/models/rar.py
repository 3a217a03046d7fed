"""RAR: next-token AR on orders that are random with probability r (annealed to raster),
with a target-aware positional embedding: the embedding of the NEXT target's cell is added
to the current token (``interleave_position_instructions(..., merge=True)``), so the
sequence is ``[c + TA[t_1], x_1 + TA[t_2], ..., x_N]`` (causal). Generation is one token
per step (raster by default) with a KV cache.
"""
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops, orders
from ..rope import CLASS_TOKEN
from . import common, condition
from .decoder_only import DecoderOnly, DecoderOnlyConfig


@dataclass(kw_only=True)
class RARConfig(DecoderOnlyConfig):
    """The decoder-only arguments and ``anneal``: the fractions of training over which the
    probability of a random order falls from 1 to 0 (:func:`sarkernels.orders.rar_ratio`)."""
    anneal: tuple = (0.25, 0.75)

    def __post_init__(self):
        self.anneal = tuple(self.anneal)  # config.json stores it as a list


class RAROrders:
    """What every RAR shares whatever its layers: training orders random with an annealed
    probability (``config.anneal``, ``config.class_dropout``), generation one token per
    step after ``_prefix_slots`` slots that hold no token (slot ``s`` then holds token
    ``s - _prefix_slots``; the last prefix slot predicts the first token), in raster order
    unless told otherwise (training anneals to it)."""
    _prefix_slots = 1
    default_order = "raster"

    def training_layout(self, batch, generator=None, progress=None):
        """Each sample's order is random with a probability annealed from 1 to 0 while the
        fraction ``progress`` of training done crosses ``anneal`` (see
        :func:`sarkernels.orders.rar_ratio`; None: always random), raster otherwise; plus
        label drops."""
        random_ratio = 1.0 if progress is None else orders.rar_ratio(progress, *self.config.anneal)
        order = orders.make_order("random", batch, self.n_tokens, generator)
        raster = torch.rand(batch, 1, generator=generator) >= random_ratio
        return dict(order=torch.where(raster, torch.arange(self.n_tokens), order),
                    drop_label=common.label_drops(batch, self.config.class_dropout, generator))

    def _default_schedule(self, schedule, steps, remaining):
        if schedule not in (None, "ar"):
            raise ValueError("RAR decodes one token per step: schedule must be 'ar'")
        return "ar", steps

    def _max_slots(self, n_tokens):
        return n_tokens + self._prefix_slots - 1  # the last token is never fed

    def _resume_slot(self, decoded):
        return decoded + self._prefix_slots

    def _slots(self, start, decoded, n):
        """Slots ``start ..`` up to the one that predicts token ``decoded``, their order
        indices (negative for the prefix slots) and no instructions."""
        slots = range(start, decoded + n + self._prefix_slots - 1)
        return list(slots), [s - self._prefix_slots for s in slots], [False] * len(slots)


class RARTransformer(RAROrders, DecoderOnly):
    """Built from a :class:`RARConfig` (or its fields as keywords)."""
    config_class = RARConfig

    def __init__(self, config=None, /, **fields):
        super().__init__(config, **fields)
        self.target_aware = nn.Parameter(torch.zeros(self.n_tokens, self.config.dim))
        self._init()

    def _init(self):
        super()._init()
        nn.init.normal_(self.target_aware, std=0.02)

    def forward(self, tokens, labels, order):
        """Logits ``[B, N, V]``: slot i predicts the token at ``order[:, i]``; ``labels``
        class labels, a :class:`~sarkernels.models.condition.Prompt` or a ``Prefix``."""
        x = self.token_dropout(self.tok_embeddings(tokens.gather(1, order)))
        prefix = condition.prefix(self, labels)
        seq = ops.interleave_position_instructions(
            x, order, self.target_aware.to(x.dtype), prefix=prefix.rows.to(x.dtype),
            merge=True, check=False)
        h = self._prefixed(prefix, seq, order)
        return self.output(h[:, prefix.length - 1:-1])

    def _feed(self, state, slots, index, instruction):
        """Slot s: its token (or the class token) plus TA of the next target, cell s; RoPE
        at the token's own cell. The prefix's other rows (slots past the image's) get no TA."""
        is_class = index < 0
        x = torch.where(is_class[:, None], condition.rows_at(state, index),
                        self.tok_embeddings(state.tokens_at(index.clamp_min(0))))
        n = state.cells.shape[1]
        ta = self.target_aware[state.cells[:, slots.clamp_max(n - 1)]]
        ta = torch.where((slots < n)[:, None], ta, 0)
        return (x + ta, torch.where(is_class, CLASS_TOKEN, state.cells[:, index.clamp_min(0)]))
