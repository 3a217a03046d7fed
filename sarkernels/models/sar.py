"""SAR's Fully Masked Transformer: predict one *set* of tokens per step.

Encoder over ``[cls] + tokens in order`` (cls is set 0, token sets 1..K): block-causal
``set(key) <= set(query)``. Decoder of target-position queries (no token content):
self-attention ``set(key) <= set(query)``, cross-attention to the encoder output
``set_enc(key) < set(query)``. The last set is never an encoder input; rather than drop it,
training keeps it, since the masks already hide it from every query that matters.

Generation caches the encoder K/V of committed tokens, the decoder self-attention K/V of
earlier queries and, per decoder layer, the cross-attention K/V of the encoder memory: step
t runs one encoder pass over set t-1 (the class token at t = 0) and one decoder pass over
the queries of set t.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .. import orders
from ..nn import Block, Rope
from ..rope import CLASS_TOKEN
from . import common, condition
from .config import Config, Configured
from .generation import Generation, Step, pick

TRAIN_SCHEDULES = ("random", "cosine", "constant", "mar")


@dataclass(kw_only=True)
class SARConfig(Config):
    """The :class:`SARTransformer` arguments: :class:`~.config.Config`'s, the depths, and how
    training partitions an image. Training draws, per sample, an order
    (``train_order``: "random" or "raster") and a partition (``train_schedule``:
    "random"/"cosine"/"constant" sizes into K sets, K drawn uniformly from ``train_steps``:
    None for 1..N, a count, a list or a ``range`` of counts, or text such as "8-32" (see
    :func:`orders.set_counts`; kept as its sorted list); "mar": a random given prefix, then
    one set, the prefix without loss)."""
    # LlamaGen widths, the depth split half encoder / half decoder (sar.md)
    PRESETS: ClassVar[dict] = {
        "B": dict(dim=768, encoder_layers=6, decoder_layers=6, n_head=12),
        "L": dict(dim=1024, encoder_layers=12, decoder_layers=12, n_head=16),
        "XL": dict(dim=1280, encoder_layers=18, decoder_layers=18, n_head=20),
    }
    encoder_layers: int = 12
    decoder_layers: int = 12
    train_order: str = "random"
    train_schedule: str = "random"
    train_steps: list | None = None

    def __post_init__(self):
        order, schedule = self.train_order, self.train_schedule
        if order not in ("random", "raster") or schedule not in TRAIN_SCHEDULES:
            raise ValueError(f"train_order must be 'random'/'raster' and train_schedule one of "
                             f"{TRAIN_SCHEDULES}, got {order!r}, {schedule!r}")
        try:
            self.train_steps = orders.set_counts(self.train_steps, self.grid_size ** 2)
        except ValueError as exc:
            raise ValueError(f"train_steps: {exc}") from None


class SARTransformer(Generation, Configured, nn.Module):
    """Built from a :class:`SARConfig` (or its fields as keywords)."""
    config_class = SARConfig

    def __init__(self, config=None, /, **fields):
        super().__init__()
        cfg = self._configure(config, fields)
        self.token_pos = nn.Embedding(self.n_tokens, cfg.dim)   # encoder: where a token sits
        self.query_pos = nn.Embedding(self.n_tokens, cfg.dim)   # decoder: the target position
        block = dict(num_heads=cfg.n_head, num_kv_heads=cfg.n_kv_head, dropout=cfg.dropout,
                     multiple_of=cfg.multiple_of)
        self.encoder = nn.ModuleList(Block(cfg.dim, **block) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(Block(cfg.dim, cross=True, **block)
                                     for _ in range(cfg.decoder_layers))
        self.encoder_norm = nn.RMSNorm(cfg.dim, eps=1e-5)
        self._head()
        self._init()

    @classmethod
    def for_training(cls, *, layers, dropout, **config):
        """The model a training run builds: ``layers`` encoder and as many decoder blocks,
        ``dropout`` in the blocks; ``config`` the other :class:`SARConfig` fields."""
        return cls(encoder_layers=layers, decoder_layers=layers, dropout=dropout, **config)

    # ------------------------------------------------------------------ passes

    def encode(self, x, sets, cells, caches=None, slots=None):
        rope = Rope(self.grid_size, cells)
        for i, layer in enumerate(self.encoder):
            x = layer(x, sets, rope=rope, cache=None if caches is None else caches[i],
                      cache_slots=slots)
        return self.encoder_norm(x)

    def decode(self, cells, sets, memory, memory_sets, memory_cells, caches=None, slots=None,
               memory_caches=None, memory_slots=None):
        x = self.query_pos(cells)
        rope = Rope(self.grid_size, cells, memory_cells)
        for i, layer in enumerate(self.decoder):
            x = layer(x, sets, rope=rope, cache=None if caches is None else caches[i],
                      cache_slots=slots, memory=memory, memory_sets=memory_sets,
                      memory_rope=rope,
                      memory_cache=None if memory_caches is None else memory_caches[i],
                      memory_slots=memory_slots)
        return self.norm(x)

    def _encoder_inputs(self, prefix, tokens, cells, sets):
        x = self.tok_embeddings(tokens) + self.token_pos(cells)
        b, c = cells.shape[0], prefix.length
        return (torch.cat([prefix.rows.to(x.dtype), x], 1), torch.cat([prefix.sets, sets], 1),
                torch.cat([cells.new_full((b, c), CLASS_TOKEN), cells], 1))

    def forward(self, tokens, labels, order, sets):
        """Logits ``[B, N, V]`` for every target, in generation ``order``; ``sets [B, N]``
        holds each ordered position's set (1..K, non-decreasing); ``labels`` class labels, a
        :class:`~sarkernels.models.condition.Prompt` or a ``Prefix``."""
        x, enc_sets, enc_cells = self._encoder_inputs(condition.prefix(self, labels),
                                                      tokens.gather(1, order), order, sets)
        memory = self.encode(x, enc_sets, enc_cells)
        return self.output(self.decode(order, sets, memory, enc_sets, enc_cells))

    def training_layout(self, batch, generator=None, progress=None):
        """Per-sample order, set ids ``[B, N]``, loss mask (False on a MAR given prefix) and
        label drops; rows can be sliced (data-parallel shards); the same at every
        ``progress`` of training."""
        n, cfg = self.n_tokens, self.config
        rows, masks = [], []
        for _ in range(batch):
            if cfg.train_schedule == "mar":
                given = int(torch.randint(0, n, (), generator=generator))
                sizes = [given, n - given] if given else [n]
                mask = torch.arange(n) >= given
            else:
                counts = cfg.train_steps or range(1, n + 1)
                k = counts[int(torch.randint(len(counts), (), generator=generator))]
                sizes = orders.set_sizes(cfg.train_schedule, n, k, generator)
                mask = torch.ones(n, dtype=torch.bool)
            rows.append(orders.set_ids(sizes))
            masks.append(mask)
        return dict(order=orders.make_order(cfg.train_order, batch, n, generator),
                    sets=torch.stack(rows), mask=torch.stack(masks),
                    drop_label=common.label_drops(batch, cfg.class_dropout, generator))

    def loss(self, tokens, labels, layout=None, generator=None):
        layout = self.training_layout(len(tokens), generator) if layout is None else layout
        order, sets, mask = (layout[k].to(tokens.device) for k in ("order", "sets", "mask"))
        logits = self(tokens, condition.prefix(self, labels, layout["drop_label"]), order, sets)
        return F.cross_entropy(logits[mask].float(), tokens.gather(1, order)[mask])

    # ------------------------------------------------------------------ generation

    def _default_schedule(self, schedule, steps, remaining):
        """Known cells form the first set (fed to the encoder, never sampled), then the
        schedule ("constant" by default) splits the rest into ``steps`` sets (default: 16,
        or fewer when fewer cells remain)."""
        schedule = "constant" if schedule is None else schedule
        if steps is None and isinstance(schedule, str) and schedule != "ar":
            steps = min(16, remaining)
        return schedule, steps

    def _new_caches(self, batch, n_tokens=None, prefix_len=1):
        n = self.n_tokens
        return {"encoder": self._kv_caches(batch, n + prefix_len, len(self.encoder)),
                "decoder": self._kv_caches(batch, n, len(self.decoder)),
                "cross": self._kv_caches(batch, n + prefix_len, len(self.decoder))}

    def _schedule(self, plan, use_kv_cache, prefix_len=1, n_tokens=None):
        """Per step ``enc [3, Le]`` (order index, -1 for the class token and -Lc .. -2 for
        the prefix's other rows; set id; cache slot) of the encoder inputs, ``dec [2, Ld]``
        of the decoder queries, and ``targets [n]``."""
        sizes = ([plan.num_known] if plan.num_known else []) + plan.sizes
        ids = orders.set_ids(sizes).tolist()
        first_extra, extra = condition.extra_entries(prefix_len - 1, 1 + self.n_tokens)
        prefix = [*extra, -1]
        steps, pos = [], 0
        for t, size in enumerate(sizes):
            if use_kv_cache:
                enc, dec = range(pos - sizes[t - 1], pos) if t else prefix, range(pos, pos + size)
            else:
                enc, dec = [*prefix, *range(pos)], range(pos + size)
            n = 0 if t == 0 and plan.num_known else size
            slots = [i + 1 if i >= -1 else first_extra[i + prefix_len] for i in enc]
            steps.append(Step((torch.tensor([list(enc), [ids[i] if i >= 0 else 0 for i in enc],
                                             slots]),
                               torch.tensor([list(dec), [ids[i] for i in dec]]),
                               torch.arange(pos + size - n, pos + size)), pos, n))
            pos += size
        return steps

    def _step(self, state, sampling, enc, dec, targets, noise):
        """Encoder slot 1 + i holds token i (slot 0 the class token, slots past 1 + N the
        prefix's other rows); decoder slot i the query of token i; the cross cache mirrors
        the encoder's slots."""
        (index, sets, slots), (queries, query_sets) = enc, dec
        rows = state.cells.shape[0]
        is_class, at = index < 0, index.clamp_min(0)
        cells = state.cells[:, at]
        x = self.tok_embeddings(state.tokens_at(at)) + self.token_pos(cells)
        x = torch.where(is_class[:, None], condition.rows_at(state, index), x)
        cells = torch.where(is_class, CLASS_TOKEN, cells)
        sets = torch.where(is_class, condition.sets_at(state, index), sets)
        caches = state.caches or {}
        memory = self.encode(x, sets, cells, caches.get("encoder"), slots)
        h = self.decode(state.cells[:, queries], query_sets.expand(rows, -1), memory, sets, cells,
                        caches.get("decoder"), queries, caches.get("cross"), slots)
        if not targets.shape[0]:
            return None
        return pick(self, state, sampling, h[:, -targets.shape[0]:], targets, noise)
