"""RandAR: decoder-only generation in any order through position-instruction tokens.

Training layout ``[c, p_0, x_0, p_1, x_1, ...]`` (length 1 + 2N, causal), where ``p_i`` is
the shared ``pos_instruct_embeddings`` rotated by the 2D RoPE of token i's cell; the loss is
read at the instruction slots. ``state_dict()`` keys and shapes match the official
checkpoints. Generation decodes several tokens per step: after a step of n queries the next
forward re-writes the temporary query slots so the cache always holds the training layout.
:meth:`RandARTransformer.generate_extrapolated` samples a larger grid than the trained one.
"""
import numbers

import torch
from torch import nn

from .. import ops, orders
from ..rope import CLASS_TOKEN, rope_angles, rotate_instruction
from . import common, condition
from .decoder_only import DecoderOnly
from .generation import Canvas, Sampling


class RandARTransformer(DecoderOnly):
    """Built from a :class:`DecoderOnlyConfig` (or its fields as keywords)."""

    def __init__(self, config=None, /, **fields):
        super().__init__(config, **fields)
        self.pos_instruct_embeddings = nn.Parameter(torch.zeros(1, self.config.dim))
        self._init()

    def _init(self):
        super()._init()
        nn.init.normal_(self.pos_instruct_embeddings, std=0.02)

    def forward(self, tokens, labels, order):
        """Logits ``[B, N, V]`` at the instruction slots, in generation ``order``; ``labels``
        class labels, a :class:`~sarkernels.models.condition.Prompt` or a ``Prefix``."""
        x = self.token_dropout(self.tok_embeddings(tokens.gather(1, order)))
        prefix = condition.prefix(self, labels)
        seq = ops.interleave_position_instructions(
            x, order, self.pos_instruct_embeddings[0].to(x.dtype), num_heads=self.n_head,
            grid_size=self.grid_size, prefix=prefix.rows.to(x.dtype), check=False)
        h = self._prefixed(prefix, seq, order.repeat_interleave(2, 1))
        return self.output(h[:, prefix.length::2])

    def training_layout(self, batch, generator=None, progress=None):
        """Per-sample random orders and label drops for a batch (rows can be sliced); the
        same at every ``progress`` of training."""
        return dict(order=orders.make_order("random", batch, self.n_tokens, generator),
                    drop_label=common.label_drops(batch, self.config.class_dropout, generator))

    def _default_schedule(self, schedule, steps, remaining):
        schedule = "randar" if schedule is None else schedule
        if schedule == "randar" and steps is None:
            steps = max(1, round(remaining * 88 / 256))  # RandAR's 88 steps at 256 tokens
        return schedule, steps

    @torch.no_grad()
    def generate_extrapolated(self, labels, scale=2, *, cfg=3.0, spatial_cfg=2.5,
                              ntk_boundary=2, mask_ratio=0.5, steps=None, low_res=None,
                              low_res_steps=None, temperature=1.0, top_k=0, top_p=1.0,
                              generator=None, use_kv_cache=True, progress=False, on_step=None):
        """Resolution extrapolation (RandAR's zero-shot recipe): ``[B, (scale*G)**2]`` tokens
        in raster order of the ``scale*G`` square grid, for a model trained on ``G x G``.

        Stage 1 is :meth:`generate` at the trained grid (``cfg_scale=cfg``, its default
        schedule or ``low_res_steps`` steps), or the given ``low_res [B, G*G]`` raster
        tokens; cell ``(r, c)`` of it becomes cell ``(scale*r, scale*c)`` of the result (the
        lattice, :func:`sarkernels.orders.lattice_cells`). Stage 2 works on the large grid in
        :func:`sarkernels.orders.hierarchical_order` (lattice shuffled, then the rest
        shuffled): the prefix ``[c, (p, x) per lattice token]``, then the other tokens by
        parallel decoding in ``steps`` steps (RandAR's schedule; default one token per
        step). Its 2D RoPE, for attention and the position instructions alike, is the
        NTK-style mix of :func:`sarkernels.rope.rope_angles` (``ntk_boundary``). Each step
        runs three branches: cond (the label), spatial (the null class) and uncond (the null
        class with ``round(mask_ratio * G*G)`` lattice token embeddings, drawn per sample,
        zeroed), guided by ``uncond + cfg * (cond - spatial) + spatial_cfg * (spatial -
        uncond)``. ``on_step`` sees stage 2's steps as in :meth:`generate`.
        """
        if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale < 2:
            raise ValueError(f"scale must be an int >= 2, got {scale!r}")
        if not 0 <= mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        for name, value in (("cfg", cfg), ("spatial_cfg", spatial_cfg)):
            if value is None or value < 0:  # the three-branch guidance needs both weights
                raise ValueError(f"{name} must be >= 0, got {value}")
        sampling = Sampling(temperature, top_k, top_p, cfg, spatial_cfg)
        prefix, batch = condition.guidance(self, labels, sampling.reps)
        device = self.output.weight.device
        grid, n = self.grid_size, self.n_tokens
        if low_res is None:
            low_res = self.generate(labels, cfg_scale=cfg, steps=low_res_steps,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator, use_kv_cache=use_kv_cache)
        low_res = torch.as_tensor(low_res).cpu()
        if low_res.shape != (batch, n) or low_res.dtype.is_floating_point:
            raise ValueError(f"low_res must be integer tokens [B, G*G] = [{batch}, {n}], got "
                             f"{low_res.dtype} {list(low_res.shape)}")
        side = scale * grid
        order = orders.hierarchical_order(batch, grid, scale, generator)
        lattice = order[:, :n]
        from_cell = (lattice // side // scale) * grid + lattice % side // scale
        steps = side * side - n if steps is None else steps
        plan = common.make_plan(batch, side * side, self.vocab_size, order=order,
                                schedule="randar", steps=steps,
                                known=(lattice, low_res.gather(1, from_cell)),
                                generator=generator, device=device)
        keep = torch.ones(3, batch, side * side)
        draw = torch.rand(batch, n, generator=generator,
                          device=generator.device if generator else "cpu")
        keep[2, :, :n] = (draw.argsort(-1) >= round(mask_ratio * n)).float().cpu()
        head_dim = self.tok_embeddings.embedding_dim // self.n_head
        canvas = Canvas(side * side, rope_angles(grid, head_dim, scale=scale,
                                                 ntk_boundary=ntk_boundary, device=device),
                        keep.flatten(0, 1).to(device, self.output.weight.dtype))
        return self._run(plan, prefix, sampling, generator, canvas=canvas,
                         use_kv_cache=use_kv_cache, progress=progress, on_step=on_step)

    def _max_slots(self, n_tokens):
        return 1 + 2 * n_tokens

    def _resume_slot(self, decoded):
        return 2 + 2 * decoded  # the x slot of the first token the last step sampled

    def _instructions(self, cells, angles=None):
        return rotate_instruction(self.pos_instruct_embeddings[0], cells, self.n_head,
                                  None if angles is not None else self.grid_size, angles=angles)

    def _slots(self, start, decoded, n):
        """Slots ``start ..`` of the committed layout up to ``decoded`` tokens (slot 0 the
        class token, 2i+1 the instruction of token i, 2i+2 token i), then the instruction
        queries of tokens ``decoded .. decoded + n - 1``."""
        committed = range(start, 1 + 2 * decoded)
        queries = range(1 + 2 * decoded, 1 + 2 * decoded + n)
        return ([*committed, *queries],
                [(s - 1) // 2 for s in committed] + list(range(decoded, decoded + n)),
                [(s - 1) % 2 == 0 for s in committed] + [True] * n)

    def _feed(self, state, slots, index, instruction):
        is_class = index < 0
        rows = condition.rows_at(state, index)
        index = index.clamp_min(0)
        cells = state.cells[:, index]
        tokens = self.tok_embeddings(state.tokens_at(index))
        if state.keep is not None:
            tokens = tokens * state.keep[:, index, None]
        x = torch.where(instruction[:, None], self._instructions(cells, state.angles), tokens)
        return (torch.where(is_class[:, None], rows, x),
                torch.where(is_class, CLASS_TOKEN, cells))
