"""The decoder-only stack RandAR and RAR share (LlamaGen's GPT), and their generation loop.

Every sequence slot attends causally by slot index; 2D RoPE uses each slot's grid cell
(the class token's rotation is all zero, as in RandAR). A subclass says how the slots of a
step are embedded (``_feed``) and where the cache resumes after a step (``_resume_slot``).
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..nn import Block, KVCache, Rope
from ..rope import CLASS_TOKEN
from . import common

PRESETS = {  # LlamaGen GPT sizes
    "B": dict(dim=768, n_layer=12, n_head=12),
    "L": dict(dim=1024, n_layer=24, n_head=16),
    "XL": dict(dim=1280, n_layer=36, n_head=20),
    "XXL": dict(dim=1536, n_layer=48, n_head=24),
}


class DecoderOnly(nn.Module):
    def __init__(self, *, vocab_size=16384, num_classes=1000, grid_size=16, dim=1024,
                 n_layer=24, n_head=16, n_kv_head=None, multiple_of=256, class_dropout=0.1,
                 token_dropout=0.1, dropout=0.1):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes, grid_size=grid_size,
                           dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                           multiple_of=multiple_of, class_dropout=class_dropout,
                           token_dropout=token_dropout, dropout=dropout)
        self.vocab_size, self.num_classes, self.grid_size = vocab_size, num_classes, grid_size
        self.n_tokens, self.n_head = grid_size * grid_size, n_head
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.cls_embedding = common.ClassEmbedding(num_classes, dim)
        self.token_dropout = nn.Dropout(token_dropout)
        self.layers = nn.ModuleList(Block(dim, n_head, n_kv_head, dropout=dropout,
                                          multiple_of=multiple_of) for _ in range(n_layer))
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.output = nn.Linear(dim, vocab_size, bias=False)

    def _init(self):
        common.init_weights(self)
        nn.init.zeros_(self.output.weight)  # LlamaGen starts from uniform predictions

    @classmethod
    def from_preset(cls, name, **overrides):
        """``from_preset("L", vocab_size=16384)``; presets B, L, XL, XXL (LlamaGen widths)."""
        return common.from_preset(cls, PRESETS, name, overrides)

    def loss(self, tokens, labels, layout=None, generator=None):
        """Mean cross-entropy of every token under a training ``layout`` (see
        :meth:`training_layout`; drawn from ``generator`` when None)."""
        layout = self.training_layout(len(tokens), generator) if layout is None else layout
        order = layout["order"].to(tokens.device)
        labels = common.drop_labels(labels, layout["drop_label"], self.num_classes)
        logits = self(tokens, labels, order)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.gather(1, order).flatten())

    def trunk(self, x, cells, start=0, caches=None):
        """Causal (by slot) layers over slots ``start ..``; returns the normed states."""
        b, length, _ = x.shape
        sets = torch.arange(start, start + length, device=x.device).expand(b, length)
        rope = Rope(self.grid_size, cells)
        for i, layer in enumerate(self.layers):
            x = layer(x, sets, rope=rope, cache=None if caches is None else caches[i],
                      cache_start=start)
        return self.norm(x)

    def _cells_with_class(self, cells):
        return torch.cat([cells.new_full((cells.shape[0], 1), CLASS_TOKEN), cells], 1)

    @torch.no_grad()
    def generate(self, labels, *, order="random", schedule=None, steps=None, cfg_scale=None,
                 temperature=1.0, top_k=0, top_p=1.0, known=None, generator=None,
                 use_kv_cache=True, progress=False, on_step=None):
        """Samples ``[B, N]`` tokens in raster order for class ``labels [B]``.

        order: "random", "raster" or a permutation; schedule: set sizes (see
        :func:`sarkernels.orders.set_sizes`) with ``steps``; ``known = (positions, tokens)``
        teacher-forces cells first (inpainting/outpainting), which appear unchanged in the
        output. ``cfg_scale`` (None = off) runs the null class as a doubled batch, the scale
        ramping from 1 to ``cfg_scale``. ``on_step(step, logits, cells)`` sees every step's
        guided logits and the cells they are for.
        """
        device = self.output.weight.device
        labels = common.check_labels(labels, self.num_classes).to(device)
        common.check_sampling(temperature, top_k, top_p, cfg_scale)
        schedule, steps = self._default_schedule(schedule, steps,
                                                 self.n_tokens - common.count_known(known))
        plan = common.make_plan(len(labels), self.n_tokens, self.vocab_size, order=order,
                                schedule=schedule, steps=steps, known=known,
                                generator=generator, device=device)
        labels, reps = common.guidance_batch(labels, self.num_classes, cfg_scale)
        cls = self.cls_embedding.embedding_table(labels)[:, None]
        caches = None
        if use_kv_cache:
            head_dim = self.tok_embeddings.embedding_dim // self.n_head
            kv_heads = self.config["n_kv_head"] or self.n_head
            caches = [KVCache(len(labels), kv_heads, self._max_slots(), head_dim,
                              self.output.weight.dtype, device) for _ in self.layers]
        decoded, start = plan.num_known, 0
        for step, n in enumerate(common.with_progress(plan.sizes, progress)):
            x, cells = self._feed(start, decoded, n, cls, plan.cells.repeat(reps, 1),
                                  plan.tokens.repeat(reps, 1))
            h = self.trunk(x, cells, start, caches)
            logits = common.guided(self.output(h[:, -n:]).float(), cfg_scale, decoded,
                                   self.n_tokens)
            plan.tokens[:, decoded:decoded + n] = common.sample(logits, temperature, top_k,
                                                                top_p, generator)
            if on_step is not None:
                on_step(step, logits, plan.cells[:, decoded:decoded + n])
            start = self._resume_slot(decoded) if use_kv_cache else 0
            decoded += n
        return common.to_raster(plan.cells, plan.tokens)
