"""The official RAR architecture (bytedance/1d-tokenizer, ``modeling/rar.py``) on the
sarkernels ops: ``state_dict()`` keys and shapes are those of the official checkpoints
(``rar_b.bin`` .. ``rar_xxl.bin``), attention is :func:`sarkernels.set_attention` over
causal set ids, and generation is the shared loop (KV caches written by
``kv_cache_append``, CFG as a doubled batch, compiled or CUDA-graph steps).

Sequence slots ``[cls, class, x_1 .. x_N]``: slot 0 a learned token, slot 1 the class row
of the one embedding table (codes ``0..V-1``, the mask ``V``, classes ``V+1 ..``, the null
class last), slot ``2+i`` token ``i``. Each slot adds a learned absolute position (rows 0
and 1 for the prefix, ``2 + cell`` for a token) and the target-aware position of the NEXT
token's cell (none on slot 0 and on the last token). Every block is a pre-LayerNorm ViT
block (qk-LayerNorm, fused qkv with bias, exact-GELU MLP) under DiT's adaLN modulation,
gates included, from a per-slot condition: the class row plus a learned per-slot
"timestep" embedding. Slot ``1+i`` predicts token ``i`` through a final adaLN layer and
``lm_head``.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import ops
from . import condition
from .config import Config, Configured
from .decoder_only import CausalSlots
from .generation import Generation, pick
from .rar import RAROrders

EPS = 1e-6  # every LayerNorm of the official model
# Rows of the official position tables past the N tokens' (they hold N + 1024 and N + 100).
POSITION_SPARE, TIMESTEP_SPARE = 1024, 100


@dataclass(kw_only=True)
class OfficialRARConfig(Config):
    """The :class:`OfficialRAR` arguments: :class:`~.config.Config`'s (``multiple_of`` and
    ``n_kv_head`` unused: every head has its K/V), the depth, ``intermediate_size`` the
    MLP's hidden width (the official config's name; None: 4 x dim), the fractions of
    training over which the random-order probability falls from 1 to 0 (the official
    200 -> 300 of 400 epochs), and ``cfg_power``, the power of the guidance ramp
    ``generate`` uses by default (None: linear). Presets: the official sizes (README_RAR.md's
    ``intermediate_size``: XXL's is 6144, not 4 x 1408) with the power of the official
    README's sampling settings (its scale and temperature: B 16.0 / 1.0, L 15.5 / 1.02,
    XL 6.9 / 1.02, XXL 8.0 / 1.02)."""
    PRESETS: ClassVar[dict] = {
        "B": dict(dim=768, n_layer=24, intermediate_size=3072, cfg_power=2.75),
        "L": dict(dim=1024, n_layer=24, intermediate_size=4096, cfg_power=2.5),
        "XL": dict(dim=1280, n_layer=32, intermediate_size=5120, cfg_power=1.5),
        "XXL": dict(dim=1408, n_layer=40, intermediate_size=6144, cfg_power=1.2),
    }
    vocab_size: int = 1024
    n_layer: int = 24
    intermediate_size: int | None = None
    anneal: tuple = (0.5, 0.75)
    cfg_power: float | None = 2.75

    def __post_init__(self):
        self.anneal = tuple(self.anneal)  # config.json stores it as a list
        if self.cond_dim is not None:
            raise ValueError(f"the official RAR is conditioned on class labels: cond_dim must "
                             f"be None, got {self.cond_dim}")
        if self.n_kv_head not in (None, self.n_head):
            raise ValueError(f"the official RAR has no grouped K/V heads: n_kv_head must be "
                             f"None or n_head={self.n_head}, got {self.n_kv_head}")


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """The official attention's parameters (fused ``qkv`` with bias, LayerNorm ``q_norm``
    and ``k_norm`` per head, ``proj``); keys visible by set ids, through a KV cache when
    given."""

    def __init__(self, dim, num_heads, dropout):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // num_heads, eps=EPS)
        self.k_norm = nn.LayerNorm(dim // num_heads, eps=EPS)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x, sets, cache=None, cache_slots=None):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        # CUDA autocast runs LayerNorm in fp32: back to the projection's dtype, the one the
        # KV cache holds and set_attention needs q, k and v to share
        q, k = self.q_norm(q).type_as(v), self.k_norm(k).type_as(v)
        key_sets = sets
        if cache is not None:
            cache.write(k, v, sets, cache_slots)
            k, v, key_sets = cache.contents()
        out = ops.set_attention(q, k, v, sets, key_sets)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


class Mlp(nn.Module):
    """timm's ``Mlp`` (its keys): fc1, exact GELU, dropout, fc2, dropout."""

    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(nn.functional.gelu(self.fc1(x)))))


class Block(nn.Module):
    """``x + gate * attn(modulate(norm1(x)))``, then the same for the MLP; shift, scale and
    gate of both from ``adaLN_modulation(c)``."""

    def __init__(self, dim, num_heads, hidden, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = Mlp(dim, hidden, dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, sets, cache=None, cache_slots=None):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, -1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), sets, cache,
                                   cache_slots)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """A LayerNorm without parameters, modulated by ``adaLN_modulation(c)`` (scale first)."""

    def __init__(self, dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=EPS, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        scale, shift = self.adaLN_modulation(c).chunk(2, -1)
        return modulate(self.norm_final(x), shift, scale)


class SharedClassRows(condition.ClassEmbedding):
    """Class ``c`` as row ``offset + c`` of the model's one embedding table, the null class
    the row after the last class. Holds no parameters of its own: the table's rows are the
    model's ``embeddings``, so it is kept out of this module's state."""

    def __init__(self, table, offset, num_classes):
        nn.Module.__init__(self)
        self.num_classes, self.offset = num_classes, offset
        self.__dict__["table"] = table

    def forward(self, labels):
        return self.table(labels + self.offset)[:, None]


class OfficialRAR(RAROrders, CausalSlots, Generation, Configured, nn.Module):
    """Built from an :class:`OfficialRARConfig` (or its fields as keywords). Generation is
    raster by default, guided by the power-cosine ramp of ``config.cfg_power``."""
    config_class = OfficialRARConfig
    _prefix_slots = 2  # cls and class

    def __init__(self, config=None, /, **fields):
        super().__init__()
        cfg = self._set_config(config, fields)
        dim, n = cfg.dim, self.n_tokens
        if dim % cfg.n_head:
            raise ValueError(f"dim {dim} must split evenly into n_head {cfg.n_head} heads")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        hidden = cfg.intermediate_size or 4 * dim
        self.blocks = nn.ModuleList(Block(dim, cfg.n_head, hidden, cfg.dropout)
                                    for _ in range(cfg.n_layer))
        self.embeddings = nn.Embedding(cfg.vocab_size + 1 + cfg.num_classes + 1, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, n + POSITION_SPARE, dim))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, n + POSITION_SPARE, dim))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, n + TIMESTEP_SPARE, dim))
        self.adaln_before_head = FinalLayer(dim)
        self.lm_head = nn.Linear(dim, cfg.vocab_size)
        self.cls_embedding = SharedClassRows(self.embeddings, cfg.vocab_size + 1, cfg.num_classes)
        self._init()

    @property
    def output(self):
        """The output projection, by the name the shared generation code reads."""
        return self.lm_head

    @property
    def default_cfg_power(self):
        return self.config.cfg_power

    @classmethod
    def for_training(cls, *, layers, dropout, **config):
        """The model a training run builds: ``layers`` blocks, ``dropout`` in them."""
        return cls(n_layer=layers, dropout=dropout, **config)

    def _init(self):
        """The official initialisation: truncated normal(0.02) weights, tables and
        embeddings, zero biases, and zero adaLN projections (so every block starts as the
        identity)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for table in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(table, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + \
                [self.adaln_before_head.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens, labels, order=None):
        """Teacher-forced logits ``[B, N, V]``: slot i predicts the token at ``order[:, i]``
        (raster when None); ``labels`` class labels or a ``Prefix``."""
        prefix = condition.prefix(self, labels)
        b, n = tokens.shape
        order = torch.arange(n, device=tokens.device).expand(b, n) if order is None else order
        slots = torch.arange(n + 1, device=tokens.device)  # the last token predicts nothing
        ids = tokens.gather(1, order)[:, (slots - self._prefix_slots).clamp_min(0)]
        x, c = self._inputs(prefix.rows, ids, order, slots)
        h = self._trunk(x, c, slots)
        return self.lm_head(self.adaln_before_head(h[:, 1:], c[:, 1:]))

    def _inputs(self, cond, ids, cells, slots):
        """Block inputs ``x`` and conditions ``c`` ``[R, L, D]`` of sequence ``slots [L]``:
        ``cond [R, 1, D]`` the class rows, ``ids [R, L]`` the code at each slot (read where
        a slot holds a token), ``cells [R, N]`` the cell of every order position."""
        first = self._prefix_slots
        n = cells.shape[1]
        is_token = slots >= first
        x = torch.where(is_token[:, None], self.embeddings(ids),
                        torch.where((slots == 0)[:, None], self.cls_token[0], cond))
        own = torch.where(is_token, first + cells[:, (slots - first).clamp_min(0)], slots)
        x = x + self.pos_embed[0, own]
        after = slots - first + 1  # the order position this slot predicts
        target = self.target_aware_pos_embed[0, first + cells[:, after.clamp(0, n - 1)]]
        x = x + torch.where(((after >= 0) & (after < n))[:, None], target, 0)
        return x, cond + self.timesteps_embeddings[0, slots]

    def _trunk(self, x, c, slots, caches=None):
        """The blocks, causal by slot; ``caches`` (a KVCache per block) written at ``slots``."""
        sets = slots.expand(len(x), -1)
        for i, block in enumerate(self.blocks):
            x = block(x, c, sets, None if caches is None else caches[i], slots)
        return x

    def _step(self, state, sampling, feed, targets, noise):
        slots, index, _ = feed.unbind(0)
        x, c = self._inputs(state.cls, state.tokens_at(index.clamp_min(0)), state.cells, slots)
        h = self._trunk(x, c, slots, None if state.caches is None else state.caches["layers"])
        n = targets.shape[0]
        return pick(self, state, sampling, self.adaln_before_head(h[:, -n:], c[:, -n:]),
                    targets, noise)
