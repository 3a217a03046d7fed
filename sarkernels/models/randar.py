"""RandAR: decoder-only generation in any order through position-instruction tokens.

Training layout ``[c, p_0, x_0, p_1, x_1, ...]`` (length 1 + 2N, causal), where ``p_i`` is
the shared ``pos_instruct_embeddings`` rotated by the 2D RoPE of token i's cell; the loss is
read at the instruction slots. ``state_dict()`` keys and shapes match the official
checkpoints. Generation decodes several tokens per step: after a step of n queries the next
forward re-writes the temporary query slots so the cache always holds the training layout.
"""
import torch
from torch import nn

from .. import ops, orders
from ..rope import CLASS_TOKEN
from . import common
from .decoder_only import DecoderOnly


class RandARTransformer(DecoderOnly):
    def __init__(self, **config):
        super().__init__(**config)
        self.pos_instruct_embeddings = nn.Parameter(torch.zeros(1, self.config["dim"]))
        self._init()

    def _init(self):
        super()._init()
        nn.init.normal_(self.pos_instruct_embeddings, std=0.02)

    def forward(self, tokens, labels, order):
        """Logits ``[B, N, V]`` at the instruction slots, in generation ``order``."""
        x = self.token_dropout(self.tok_embeddings(tokens.gather(1, order)))
        seq = ops.interleave_position_instructions(
            x, order, self.pos_instruct_embeddings[0].to(x.dtype), num_heads=self.n_head,
            grid_size=self.grid_size, prefix=self.cls_embedding(labels).to(x.dtype), check=False)
        h = self.trunk(seq, self._cells_with_class(order.repeat_interleave(2, 1)))
        return self.output(h[:, 1::2])

    def training_layout(self, batch, generator=None):
        """Per-sample random orders and label drops for a batch (rows can be sliced)."""
        return dict(order=orders.make_order("random", batch, self.n_tokens, generator),
                    drop_label=common.label_drops(batch, self.config["class_dropout"], generator))

    def _default_schedule(self, schedule, steps, remaining):
        schedule = "randar" if schedule is None else schedule
        if schedule == "randar" and steps is None:
            steps = max(1, round(remaining * 88 / 256))  # RandAR's 88 steps at 256 tokens
        return schedule, steps

    def _max_slots(self):
        return 1 + 2 * self.n_tokens

    def _resume_slot(self, decoded):
        return 2 + 2 * decoded  # the x slot of the first token the last step sampled

    def _instructions(self, cells):
        b, length = cells.shape
        heads = self.pos_instruct_embeddings.view(1, self.n_head, 1, -1).expand(b, -1, length, -1)
        return ops.rope_2d(heads, cells, self.grid_size, check=False).transpose(1, 2).flatten(2)

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
        index = index.clamp_min(0)
        cells = state.cells[:, index]
        x = torch.where(instruction[:, None], self._instructions(cells),
                        self.tok_embeddings(state.tokens_at(index)))
        return (torch.where(is_class[:, None], state.cls, x),
                torch.where(is_class, CLASS_TOKEN, cells))
