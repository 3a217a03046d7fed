"""Generation throughput side by side in one run: KV cache vs recompute, sets per step,
our ops vs the reference ops. Random weights (speed does not depend on training).

    python benchmarks/generation.py                       # small CPU config
    python benchmarks/generation.py --config L --device cuda --dtype bfloat16 --batch 64

Prints a markdown table: images/s, ms per step, and each row's speed relative to the
first row of its model.
"""
import argparse
import statistics
import time

import torch

import sarkernels
from sarkernels.models import RandARTransformer, RARTransformer, SARTransformer

CONFIGS = {
    "small": dict(vocab_size=1024, num_classes=10, grid_size=16, dim=256, n_head=4),
    "L": dict(vocab_size=16384, num_classes=1000, grid_size=16, dim=1024, n_head=16),
}


def build(kind, config, device, dtype):
    cfg = dict(CONFIGS[config])
    depth = 24 if config == "L" else 4
    if kind == "sar":
        model = SARTransformer(encoder_layers=depth // 2, decoder_layers=depth // 2, **cfg)
    else:
        model = (RandARTransformer if kind == "randar" else RARTransformer)(n_layer=depth, **cfg)
    for p in model.parameters():  # untrained output heads are all zero: give them something
        torch.nn.init.normal_(p, std=0.02)
    return model.to(device, dtype).eval()


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=list(CONFIGS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-recompute", action="store_true",
                        help="leave out the no-cache rows (slow at large sizes)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    labels = torch.arange(args.batch) % CONFIGS[args.config]["num_classes"]
    rows = [  # model, label, generate kwargs, backend
        ("randar", "88 steps (randar), cache", dict(schedule="randar", steps=88), "auto"),
        ("randar", "256 steps (ar), cache", dict(schedule="ar"), "auto"),
        ("randar", "88 steps, cache, reference ops", dict(schedule="randar", steps=88), "reference"),
        ("randar", "88 steps, recompute", dict(schedule="randar", steps=88, use_kv_cache=False), "auto"),
        ("sar", "16 sets, cache", dict(schedule="constant", steps=16), "auto"),
        ("sar", "64 sets, cache", dict(schedule="constant", steps=64), "auto"),
        ("sar", "256 sets (ar), cache", dict(schedule="ar"), "auto"),
        ("sar", "16 sets, cache, reference ops", dict(schedule="constant", steps=16), "reference"),
        ("sar", "16 sets, recompute", dict(schedule="constant", steps=16, use_kv_cache=False), "auto"),
        ("rar", "256 steps (raster), cache", dict(order="raster"), "auto"),
        ("rar", "256 steps, recompute", dict(order="raster", use_kv_cache=False), "auto"),
    ]
    if args.skip_recompute:
        rows = [r for r in rows if r[2].get("use_kv_cache", True)]
    print(f"device {args.device}, {args.dtype}, config {args.config}, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}")
    print("| model | recipe | steps | s / batch | images/s | ms / step | vs first row |")
    print("|---|---|---|---|---|---|---|")
    models, first = {}, {}
    for kind, label, kw, backend in rows:
        if kind not in models:
            models[kind] = build(kind, args.config, args.device, dtype)
        model = models[kind]
        steps = []
        run = lambda: model.generate(labels.to(args.device), generator=torch.Generator().manual_seed(0),
                                     on_step=lambda s, l, c: steps.append(s), **kw)
        with sarkernels.use_backend(backend):
            seconds = timed(run, args.device, args.repeats)
        n_steps = max(steps) + 1
        first.setdefault(kind, seconds)
        print(f"| {kind} | {label} | {n_steps} | {seconds:.3f} | {args.batch / seconds:.1f} | "
              f"{1e3 * seconds / n_steps:.2f} | {first[kind] / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
