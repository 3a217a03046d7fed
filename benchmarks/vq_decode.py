"""VQ-16 decode speed (random weights; speed does not depend on them), to set next to the
generation time per image.

    python benchmarks/vq_decode.py                                   # CPU, float32, batch 8
    python benchmarks/vq_decode.py --device cuda --dtype bfloat16 --batch 64 --channels-last --compile
"""
import argparse
import statistics
import time

import torch

from sarkernels.tokenizers import VQTokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    vq = VQTokenizer.from_preset("VQ-16").to(args.device, getattr(torch, args.dtype)).eval()
    if args.channels_last:
        vq = vq.to(memory_format=torch.channels_last)
    decode = torch.compile(vq.decode_codes) if args.compile else vq.decode_codes
    codes = torch.randint(0, 16384, (args.batch, 256), device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        decode(codes)
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            decode(codes)
            sync()
            times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    print(f"VQ-16 decode {args.device} {args.dtype} batch {args.batch} channels_last="
          f"{args.channels_last} compile={args.compile}: {ms:.1f} ms per batch, "
          f"{ms / args.batch:.1f} ms per image (median of {args.repeats})")


if __name__ == "__main__":
    main()
