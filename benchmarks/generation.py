"""Generation throughput side by side in one run: eager, compiled and CUDA-graph steps, our
ops vs the reference ops, KV cache vs recompute; each row also against the memory floor of
reading the weights and the live KV cache once per step. Random weights (speed does not
depend on training).

    python benchmarks/generation.py                       # small CPU config
    python benchmarks/generation.py --config L --device cuda --dtype bfloat16 --batch 64 \\
        --recipes randar-88 sar-16 sar-64 --modes eager graphs reference --cfg-scale 4

Prints a markdown table: images/s, ms per step, the floor per step at ``--bandwidth`` (GB/s;
measured with a device-to-device copy when not given), and each row's speed relative to
the first row of its recipe.
"""
import argparse
import gc
import statistics
import time

import torch
from torch import nn

import sarkernels
from sarkernels import orders
from sarkernels.models import RandARTransformer, RARTransformer, SARTransformer

CONFIGS = {
    "tiny": dict(vocab_size=64, num_classes=10, grid_size=4, dim=64, n_head=4, multiple_of=32),
    "small": dict(vocab_size=1024, num_classes=10, grid_size=16, dim=256, n_head=4),
    "L": dict(vocab_size=16384, num_classes=1000, grid_size=16, dim=1024, n_head=16),
}
DEPTH = {"tiny": 2, "small": 4, "L": 24}
RECIPES = {  # name: model, generate kwargs (fractions of N scale the step counts to the grid)
    "randar-88": ("randar", lambda n: dict(schedule="randar", steps=max(1, n * 88 // 256))),
    "randar-ar": ("randar", lambda n: dict(schedule="ar")),
    "sar-16": ("sar", lambda n: dict(schedule="constant", steps=min(16, n))),
    "sar-64": ("sar", lambda n: dict(schedule="constant", steps=min(64, n))),
    "sar-ar": ("sar", lambda n: dict(schedule="ar")),
    "rar-raster": ("rar", lambda n: dict(order="raster")),
}
MODES = {  # name: generate kwargs, ops backend
    "eager": (dict(), "auto"),
    "compile": (dict(compile=True), "auto"),
    "graphs": (dict(graphs=True), "auto"),
    "reference": (dict(), "reference"),
    "reference-graphs": (dict(graphs=True), "reference"),
    "recompute": (dict(use_kv_cache=False), "auto"),
}


def build(kind, config, device, dtype):
    cfg = dict(CONFIGS[config])
    depth = DEPTH[config]
    if kind == "sar":
        model = SARTransformer(encoder_layers=depth // 2, decoder_layers=depth // 2, **cfg)
    else:
        model = (RandARTransformer if kind == "randar" else RARTransformer)(n_layer=depth, **cfg)
    for p in model.parameters():  # untrained output heads are all zero: give them something
        torch.nn.init.normal_(p, std=0.02)
    return model.to(device, dtype).eval()


def floor_bytes(model, kind, sizes, rows):
    """Bytes a step must read at least, summed over the steps: every weight matrix once
    (embedding tables are gathered, not read whole) and the K/V of every live cache slot."""
    weights = sum(p.numel() * p.element_size() for m in model.modules()
                  if isinstance(m, (nn.Linear, nn.RMSNorm)) for p in m.parameters(recurse=False))
    cfg = model.config
    slot = 2 * rows * (cfg.n_kv_head or cfg.n_head) * (cfg.dim // cfg.n_head) \
        * model.output.weight.element_size()  # K and V of one slot in one layer
    total, done = 0, 0
    for n in sizes:
        if kind == "randar":
            live = cfg.n_layer * (1 + 2 * done + n)
        elif kind == "rar":
            live = cfg.n_layer * (done + 1)
        else:  # encoder and cross caches hold the class token and the committed tokens
            live = (cfg.encoder_layers + cfg.decoder_layers) * (1 + done) \
                + cfg.decoder_layers * (done + n)
        total += weights + live * slot
        done += n
    return total


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up (and, for graphs/compile, capture/compile)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_bandwidth(device):
    """GB/s of a device-to-device copy of 1 GiB (256 MiB on CPU), read + write."""
    x = torch.empty((2**30 if device == "cuda" else 2**28) // 4, device=device)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), device, 5)
    return 2 * x.nbytes / seconds / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=list(CONFIGS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cfg-scale", type=float,
                        help="classifier-free guidance (doubles the batch)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--modes", nargs="+", choices=list(MODES),
                        help="default: eager reference recompute (+ graphs on CUDA)")
    parser.add_argument("--bandwidth", type=float, help="GB/s for the floor (default: measured)")
    args = parser.parse_args()
    modes = args.modes or ["eager", *(["graphs"] if args.device == "cuda" else []),
                           "reference", "recompute"]
    dtype = getattr(torch, args.dtype)
    bandwidth = args.bandwidth or measure_bandwidth(args.device)
    labels = (torch.arange(args.batch) % CONFIGS[args.config]["num_classes"]).to(args.device)
    rows = args.batch * (1 if args.cfg_scale is None else 2)
    n = CONFIGS[args.config]["grid_size"] ** 2
    print(f"device {args.device}, {args.dtype}, config {args.config}, batch {args.batch}, "
          f"cfg {args.cfg_scale}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; floor at {bandwidth:.0f} GB/s "
          f"({'given' if args.bandwidth else 'measured copy'})")
    print("| model | recipe | mode | steps | s / batch | images/s | ms / step | floor ms / step "
          "| x floor | vs first row |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    models = {}
    for recipe in args.recipes:
        kind, make_kw = RECIPES[recipe]
        if kind not in models:  # one model at a time; its cached generation buffers with it
            models.clear()
            gc.collect()
            models[kind] = build(kind, args.config, args.device, dtype)
        model, kw = models[kind], make_kw(n)
        sizes = orders.set_sizes(kw.get("schedule", "ar"), n, kw.get("steps"))
        floor = floor_bytes(model, kind, sizes, rows) / (bandwidth * 1e9)
        first = None
        for mode in modes:
            mode_kw, backend = MODES[mode]
            run = lambda: model.generate(labels, generator=torch.Generator().manual_seed(0),
                                         cfg_scale=args.cfg_scale, **kw, **mode_kw)
            with sarkernels.use_backend(backend):
                seconds = timed(run, args.device, args.repeats)
            first = first or seconds
            print(f"| {kind} | {recipe} | {mode} | {len(sizes)} | {seconds:.3f} | "
                  f"{args.batch / seconds:.1f} | {1e3 * seconds / len(sizes):.2f} | "
                  f"{1e3 * floor / len(sizes):.3f} | {seconds / floor:.1f} | "
                  f"{first / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
