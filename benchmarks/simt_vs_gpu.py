"""The CUDA kernels on the GPU against the same kernels under the SIMT executor, on
identical inputs: bitwise where the kernels only copy or add (kv_cache_append, the table
interleave and its deterministic backward), within the attention tolerance otherwise.

    python benchmarks/simt_vs_gpu.py                 # needs a GPU, a CUDA build and _simt
    python benchmarks/simt_vs_gpu.py --device cpu    # dry run: simt against the CPU kernels

Prints one markdown row per case and exits non-zero if any case disagrees.
"""
import argparse
import sys

import torch

import sarkernels

# Attention: float64 agrees to rounding; lower precisions to a few units of their last place
# (the GPU fuses multiply-adds and its exp differs from glibc's in the last bits).
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def on_both(fn, device, *inputs):
    """fn(*inputs) on the simt backend (CPU) and on `device` with the kernels backend."""
    with sarkernels.use_backend("simt"):
        simt = fn(*inputs)
    moved = [t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs]
    with sarkernels.use_backend("kernels"):
        other = fn(*moved)
    return [t.detach() for t in simt], [t.detach().cpu() for t in other]


def attention_cases(gen):
    for dtype in TOL:
        for b, hq, hkv, lq, lk, d in [(4, 16, 16, 2, 517, 64), (2, 8, 2, 33, 300, 128),
                                      (1, 4, 1, 5, 1000, 256), (3, 2, 2, 7, 40, 40)]:
            q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype)
                       for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
            q_sets = torch.randint(-1, 8, (b, lq), generator=gen)
            k_sets = torch.randint(0, 8, (b, lk), generator=gen)
            yield f"set_attention {dtype} {tuple(q.shape)} kv {tuple(k.shape)}", (q, k, v, q_sets, k_sets)


def attention(q, k, v, q_sets, k_sets):
    return sarkernels.set_attention(q, k, v, q_sets, k_sets, return_lse=True)


def kv_cases(gen):
    for dtype in TOL:
        for d in (1, 8, 64, 72):
            cache = torch.randn(3, 4, 50, d, generator=gen).to(dtype)
            new = torch.randn(3, 7, 4, d, generator=gen).to(dtype).transpose(1, 2)
            slots = torch.stack([torch.randperm(50, generator=gen)[:7] for _ in range(3)])
            yield f"kv_cache_append {dtype} D={d}", (cache, new, slots)


def kv_append(cache, new, slots):
    k, v = cache.clone(), cache.clone()
    sarkernels.kv_cache_append(k, v, new, -new, slots)
    return [k, v]


def interleave_cases(gen):
    for dtype in TOL:
        for table in (True, False):
            for merge in (False, True):
                tokens = torch.randn(4, 64, 128, generator=gen).to(dtype)
                positions = torch.stack([torch.randperm(256, generator=gen)[:64] for _ in range(4)])
                instruction = torch.randn(*((256, 128) if table else (128,)), generator=gen).to(dtype)
                prefix = torch.randn(4, 1, 128, generator=gen).to(dtype)
                grad = torch.randn(4, 1 + (64 if merge else 128), 128, generator=gen).to(dtype)
                name = f"interleave {dtype} {'table' if table else 'rope'} {'merge' if merge else ''}"
                yield name, table, (tokens, positions, instruction, prefix, grad, merge)


def interleave(tokens, positions, instruction, prefix, grad, merge):
    leaves = [t.clone().requires_grad_() for t in (tokens, instruction, prefix)]
    out = sarkernels.interleave_position_instructions(
        leaves[0], positions, leaves[1], num_heads=4, grid_size=16, prefix=leaves[2], merge=merge)
    return [out, *torch.autograd.grad(out, leaves, grad)]


def compare(name, simt, other, bitwise, tol):
    """Bitwise, or |a - b| <= tol * (1 + |b|) with NaN and inf in the same places."""
    worst, ok = 0.0, True
    for a, b in zip(simt, other):
        if bitwise:
            ok &= torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        a, b = a.double(), b.double()
        ok &= torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        finite = a.isfinite() & b.isfinite()
        err = (a - b).abs()[finite]
        if err.numel():
            worst = max(worst, err.max().item())
            ok &= bitwise or bool((err <= tol * (1 + b.abs()[finite])).all())
    print(f"| {name} | {'bitwise' if bitwise else f'tol {tol:g}'} | {worst:.3g} | "
          f"{'ok' if ok else 'MISMATCH'} |")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="where the kernels backend runs")
    args = parser.parse_args()
    backends = sarkernels.info()["backends"]
    other = "cuda" if args.device == "cuda" else "cpu"
    for name in ("simt", other):
        if not backends[name]["usable"]:
            sys.exit(f"simt_vs_gpu: the {name} backend is not usable: {backends[name]['why_not']}")
    gen = torch.Generator().manual_seed(0)
    print(f"| case (simt vs {args.device}) | rule | max abs diff | |\n|---|---|---|---|")
    ok = True
    for name, inputs in attention_cases(gen):
        ok &= compare(name, *on_both(attention, args.device, *inputs), False, TOL[inputs[0].dtype])
    for name, inputs in kv_cases(gen):
        ok &= compare(name, *on_both(kv_append, args.device, *inputs), True, 0.0)
    torch.use_deterministic_algorithms(True)  # the column-ownership instruction gradient
    for name, table, inputs in interleave_cases(gen):
        # table rows are only added: the same bits; the rope path fuses multiply-adds on GPU
        ok &= compare(name, *on_both(interleave, args.device, *inputs), table,
                      TOL[inputs[0].dtype])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
