"""What SAR, RandAR and RAR share: class embedding, argument checks, the generation plan
(order, known cells, set sizes), sampling and classifier-free guidance."""
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import orders
from ..checks import integer, integer_tensor, real


class ClassEmbedding(nn.Module):
    """``num_classes + 1`` rows; the last is the null class that classifier-free guidance
    conditions on (training drops labels to it through the layout's ``drop_label``)."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.embedding_table(labels)[:, None]


def drop_labels(labels, drop, num_classes):
    """Labels with the rows where ``drop`` is True replaced by the null class."""
    return torch.where(drop.to(labels.device), num_classes, labels)


def label_drops(batch, p, generator=None):
    return torch.rand(batch, generator=generator) < p


def init_weights(module, std=0.02):
    """LlamaGen's initialisation: normal(0, 0.02) linears and embeddings, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def check_labels(labels, num_classes, values=True):
    """``labels`` (a 1-D integer tensor) as int64; ``values``: also in ``[0, num_classes)``
    (a host sync on CUDA)."""
    labels = integer_tensor(None, "labels", torch.as_tensor(labels))
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [B], got shape {list(labels.shape)}")
    if values and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got min {labels.min().item()} "
                         f"max {labels.max().item()}")
    return labels


def count_known(known):
    """How many cells ``known = (positions, tokens)`` gives per sample (0 for None)."""
    return 0 if known is None else torch.as_tensor(known[0]).shape[-1]


@dataclass
class Plan:
    """Generation order with known cells first: ``cells [B, N]``, ``tokens [B, N]``
    (known ones filled, -1 elsewhere), ``num_known`` and the sizes of the sets to sample."""
    cells: torch.Tensor
    tokens: torch.Tensor
    num_known: int
    sizes: list


def make_plan(batch, n, vocab_size, *, order, schedule, steps, known, generator, device):
    order = orders.make_order(order, batch, n, generator)
    tokens = torch.full((batch, n), -1, dtype=torch.long)
    num_known = 0
    if known is not None:
        positions, values = (torch.as_tensor(t).long().cpu() for t in known)
        positions = positions.expand(batch, -1) if positions.dim() == 1 else positions
        values = values.expand(batch, -1) if values.dim() == 1 else values
        if positions.shape != values.shape or positions.shape[0] != batch:
            raise ValueError(f"known: positions {list(positions.shape)} and tokens "
                             f"{list(values.shape)} must both be [M] or [B={batch}, M]")
        num_known = positions.shape[1]
        if num_known and (positions.min() < 0 or positions.max() >= n):
            raise ValueError(f"known positions must lie in the grid [0, {n})")
        if num_known and (values.min() < 0 or values.max() >= vocab_size):
            raise ValueError(f"known tokens must be in [0, {vocab_size})")
        ordered = positions.sort(-1).values
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ValueError("known positions must not repeat within a row")
        if num_known == n:
            raise ValueError("known covers every cell: nothing to generate")
        is_known = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, positions, True)
        rest = order[~is_known.gather(1, order)].view(batch, n - num_known)
        order = torch.cat([positions, rest], 1)
        tokens[:, :num_known] = values
    sizes = orders.set_sizes(schedule, n - num_known, steps, generator)
    return Plan(order.to(device), tokens.to(device), num_known, sizes)


def check_sampling(temperature, top_k, top_p, cfg_scale, spatial_cfg=None, cfg_power=None):
    """generate's sampling settings (a guidance weight or power None: off). The messages
    name the argument alone: the CLI reports them as they are."""
    real(None, "temperature", temperature, above=0)
    integer(None, "top_k", top_k, 0)
    if not 0 < real(None, "top_p", top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for name, weight in (("cfg_scale", cfg_scale), ("spatial_cfg", spatial_cfg),
                         ("cfg_power", cfg_power)):
        if weight is not None:  # NaN or inf would make every guided logit NaN
            real(None, name, weight, 0, finite=True)


def sample(logits, noise, temperature=1.0, top_k=0, top_p=1.0):
    """One token per row of ``logits [..., V]`` (float32 math), without a host sync.

    ``noise`` holds Exp(1) draws of ``logits``' shape (:func:`draw_noise`): the token is
    ``argmax(probs / noise)``, the exponential race ``torch.multinomial`` runs for a single
    draw, minus its host-side check of the probabilities.
    """
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    # A zero draw would turn a masked token's 0 / 0 into NaN, which argmax picks.
    return (F.softmax(logits, -1) / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(-1)


def draw_noise(noise, generator=None):
    """Fills ``noise`` in place with the Exp(1) draws :func:`sample` takes."""
    return noise.exponential_(generator=generator)


def with_progress(steps, enabled):
    if not enabled:
        return steps
    from tqdm.auto import tqdm
    return tqdm(steps, desc="generate", leave=False)


def guided(logits, cfg_scale, done, n, spatial_cfg=None, power=None):
    """Classifier-free guidance on a doubled batch (conditional rows first), the scale
    ramping from 1 to ``cfg_scale`` with the fraction ``f = done / n`` decoded (``done`` an
    int or a 0-d device tensor): linearly, or with a ``power``, as the official RAR sampler
    (MDT's power-cosine ramp) ``1 + (cfg_scale - 1) * (1 - cos(pi * f ** power)) / 2``
    (power 0: ``cfg_scale`` throughout, 0 ** 0 being 1).

    With ``spatial_cfg``, RandAR's resolution-extrapolation guidance on a tripled batch
    (cond, spatial, uncond rows), constant scales:
    ``uncond + cfg_scale * (cond - spatial) + spatial_cfg * (spatial - uncond)``."""
    if spatial_cfg is not None:
        cond, spatial, uncond = logits.chunk(3)
        return uncond + cfg_scale * (cond - spatial) + spatial_cfg * (spatial - uncond)
    if cfg_scale is None:
        return logits
    cond, uncond = logits.chunk(2)
    if power is None:
        scale = 1 + (cfg_scale - 1) * done / n
    else:
        ramp = torch.as_tensor(done, device=logits.device) / n
        scale = 1 + (cfg_scale - 1) * (1 - torch.cos(ramp ** power * math.pi)) / 2
    return uncond + scale * (cond - uncond)


def to_raster(cells, tokens):
    """Tokens in generation order back to raster order."""
    return torch.empty_like(tokens).scatter_(1, cells, tokens)
