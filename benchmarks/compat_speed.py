"""The three ways into other projects' models (sarkernels.compat), each side by side with
plain torch SDPA in one process: the ``sdpa`` entry point on one attention call, a model
under ``use_sarkernels_sdpa``, and a LlamaGen model (the tests' transcription of its GPT)
before and after ``patch_llamagen``, training step and cached generation.

    python benchmarks/compat_speed.py --repeats 5 --threads 1   # median of repeats after a warm-up,
                                                                # torch's and ours alternating

Prints a markdown table: median ms per case for torch and for sarkernels, and torch / ours
(> 1: ours is faster).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sarkernels import compat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python_tests"))
import llamagen_gpt as gpt  # noqa: E402  (a transcription of LlamaGen's GPT, for tests)


def medians_ms(fns, repeats):
    """Median ms of each of ``fns`` after a warm-up, their runs alternating: on a shared
    machine, load that comes and goes then weighs on both sides of a row alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [1e3 * statistics.median(spent) for spent in times]


def attention_cases(b, h, length, d, sets_of):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=gen, requires_grad=True) for _ in range(3))
    block = torch.arange(length) // sets_of
    mask = block[:, None] >= block[None]  # block-causal, built once as models do
    shape = f"B{b} H{h} L{length} D{d}"

    def fwd_bwd(attend, **kw):
        def run():
            attend(q, k, v, **kw).sum().backward()
        return run
    return [
        (f"sdpa fwd causal {shape}", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
         lambda: compat.sdpa(q, k, v, is_causal=True)),
        (f"sdpa fwd block{sets_of} bool mask {shape}",
         lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
         lambda: compat.sdpa(q, k, v, attn_mask=mask)),
        (f"sdpa fwd+bwd causal {shape}", fwd_bwd(F.scaled_dot_product_attention, is_causal=True),
         fwd_bwd(compat.sdpa, is_causal=True)),
        (f"sets_from_mask (once per mask) L{length}", None,
         lambda: compat.sets_from_mask(mask)),
    ]


class Foreign(torch.nn.Module):
    """A model that knows nothing of sarkernels: causal self-attention through torch's SDPA."""

    def __init__(self, dim, heads, layers):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x):
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + out(y.transpose(1, 2).flatten(2))
        return x


def context_case(b, length):
    model, x = Foreign(512, 8, 4), torch.randn(b, length, 512)

    def routed():
        with torch.no_grad(), compat.use_sarkernels_sdpa():
            model(x)

    def plain():
        with torch.no_grad():
            model(x)
    return [(f"use_sarkernels_sdpa: 4 layers dim 512 H8 B{b} L{length} fwd", plain, routed)]


def llamagen_cases(b, new_tokens):
    def build():
        torch.manual_seed(0)
        return gpt.Transformer(gpt.ModelArgs(
            dim=512, n_layer=4, n_head=8, vocab_size=1024, num_classes=10, block_size=256,
            token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0))
    original, patched = build(), compat.patch_llamagen(build())
    idx, cond = torch.randint(0, 1024, (b, 256)), torch.randint(0, 10, (b,))

    def train(model):
        def run():
            model.train()
            model(idx[:, :-1], cond, targets=idx)[1].backward()
        return run

    def generate(model):
        def run():
            model.eval()
            gpt.generate(model, cond, new_tokens, cfg_scale=2.0)
        return run
    return [(f"patch_llamagen: train step dim 512 4 layers B{b} L257", train(original),
             train(patched)),
            (f"patch_llamagen: generate {new_tokens} tokens, CFG, B{b}", generate(original),
             generate(patched))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (default 7)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's, here %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = attention_cases(4, 8, 1024, 64, 16) + context_case(4, 512) + llamagen_cases(4, 64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of "
          f"{args.repeats}\n")
    print("| case | torch ms | sarkernels ms | torch / ours |\n|---|---|---|---|")
    for name, theirs, ours in cases:
        if theirs is None:
            print(f"| {name} | | {medians_ms([ours], args.repeats)[0]:.2f} | |")
            continue
        t_theirs, t_ours = medians_ms([theirs, ours], args.repeats)
        print(f"| {name} | {t_theirs:.2f} | {t_ours:.2f} | {t_theirs / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
