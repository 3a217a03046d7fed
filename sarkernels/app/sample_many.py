"""``python -m sarkernels sample-many``: a checkpoint to N images in the ADM evaluation
suite's format, one ``.npz`` with ``arr_0`` uint8 ``[N, H, W, 3]`` and ``arr_1`` the labels.

One global list of labels is cut into batches of ``--batch``; batch ``i`` is sampled with a
generator seeded from ``(--seed, i)`` by process ``i % world``, so the images depend on the
settings and the batch size but not on the number of processes. Each finished batch is a
shard ``OUT.parts/batch-NNNNNN.npz`` written under a temporary name and renamed: a rerun
skips the shards that are complete, redoes those that are not (a zip CRC, the shape or the
labels disagree) and never merges one of them. Process 0 holds ``OUT.parts/.lock`` while
the run lasts (a second run into the same --out stops with the holder's pid), and the merged
file too is written under a temporary name in ``OUT.parts``, so a killed merge leaves nothing
next to --out that the next run would not remove.
"""
import json
import os
import sys
import time
import zipfile

import numpy as np
import torch

from . import checkpoint, outputs, sample
from .cli_args import UsageError

SETTINGS = "settings.json"
TMP = checkpoint.TMP


def labels(num_classes, n=None, per_class=None, seed=0):
    """The global list: ``per_class`` of every class in class order, or ``n`` drawn
    uniformly from ``seed``."""
    if per_class is not None:
        return torch.arange(num_classes).repeat_interleave(per_class)
    return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def batch_seed(seed, index):
    """A 64-bit seed for batch ``index``: distinct for every (seed, index) pair, unlike
    ``seed + index``, under which two runs' seeds would share batches."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def parts_folder(out):
    return os.path.splitext(out)[0] + ".parts"


def shard_path(parts, index):
    return os.path.join(parts, f"batch-{index:06d}.npz")


def to_uint8(images):
    """``[B, C, H, W]`` in [0, 1] (C = 1: grey, replicated) -> uint8 ``[B, H, W, 3]``."""
    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
    return pixels.expand(*pixels.shape[:3], 3).contiguous().numpy()


def read_shard(path, want_labels):
    """``(images, None)`` of a complete shard for ``want_labels``, or ``(None, why)``."""
    try:
        with np.load(path) as f:  # reading a member checks its zip CRC
            images, got = f["images"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 \
            or len(images) != len(want_labels):
        return None, f"images {images.dtype} {list(images.shape)}, not uint8 " \
                     f"[{len(want_labels)}, H, W, 3]"
    if not np.array_equal(got, want_labels):
        return None, "its labels are not this batch's"
    return images, None


def _atomic(path, write, folder=None):
    """Writes ``path`` through a temporary file in ``folder`` (default: ``path``'s)."""
    name = f"{os.path.basename(path)}{TMP}{os.getpid()}"
    tmp = os.path.join(folder or os.path.dirname(path), name)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:  # a half-written file must not be left to fill a disk
        checkpoint.remove(tmp)
        raise


def write_shard(path, images, batch_labels):
    _atomic(path, lambda f: np.savez(f, images=images, labels=batch_labels))


def merge(parts, out, batches):
    """Writes ``out`` from the shards, streaming ``arr_0`` (50,000 ImageNet images are 9.8 GB)
    into a temporary file among them (cleaned up with them)."""
    first, why = read_shard(shard_path(parts, 0), batches[0])
    if first is None:
        raise ValueError(f"{shard_path(parts, 0)} is corrupt ({why}): run the same command again "
                         "to redo it")
    shape = (sum(map(len, batches)), *first.shape[1:])

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(
                    member, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for i, want in enumerate(batches):
                    images, why = read_shard(shard_path(parts, i), want)
                    if images is None or images.shape[1:] != first.shape[1:]:
                        raise ValueError(f"{shard_path(parts, i)} is corrupt ({why or 'another size'})"
                                         ": run the same command again to redo it")
                    member.write(images.tobytes())
            with z.open("arr_1.npy", "w") as member:
                np.lib.format.write_array(member, np.concatenate(batches))
    _atomic(out, write, parts)
    return shape


def settings(args, model, config, path):
    """What the shards depend on (a rerun must match it), for the model :func:`load` gave:
    its heads as resolved (official weights: --heads, RandAR's --preset or the tensors')."""
    n = args.n if args.n is not None else args.per_class * config["num_classes"]
    official_randar = sample.official(args) and args.model == "randar"
    return {"ckpt": os.path.abspath(path), "model": config["model"],
            "preset": args.preset if official_randar else None, "heads": model.n_head,
            "recipe": sample.recipe_name(args, config["model"]), "cfg": args.cfg,
            "cfg_power": args.cfg_power, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed, "n": n, "per_class": args.per_class,
            "batch": args.batch, "precision": precision(args),
            "vq": args.vq and os.path.abspath(args.vq), "image_size": args.image_size}


def precision(args):
    return args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")


def check(args):
    """What can be checked before loading a model."""
    if (args.n is None) == (args.per_class is None):
        raise UsageError("give one of --n N (labels drawn at random) and --per-class K "
                         "(K images of every class)")
    if not args.out.endswith(".npz"):
        raise UsageError(f"--out {args.out!r} must end in .npz (the ADM suite's format)")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a folder; give a file name such as samples.npz")
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} exists: pass --overwrite to sample it again, or "
                         "another --out")
    if args.precision == "bf16" and not args.device.startswith("cuda"):
        raise UsageError("--precision bf16 is for CUDA devices; the CPU samples in fp32")
    sample.check_source(args)
    outputs.folder(os.path.dirname(os.path.abspath(args.out)), "--out's folder")


def same_settings(path, want, what):
    """Raises a UsageError unless the settings file ``path``, where present, holds ``want``."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        have = json.load(f)
    differ = [f"{k} {have.get(k)!r} (now {v!r})" for k, v in want.items() if have.get(k) != v]
    if differ:
        raise UsageError(f"{os.path.dirname(path)} holds {what} sampled with other settings: "
                         f"{'; '.join(differ[:3])}: pass the same settings to continue, or "
                         "--overwrite to start over")


def prepare(args, parts, want, rank, what="shards", command="sample-many"):
    """Checks the settings of the ``what`` in folder ``parts`` against ``want`` on every
    process. Process 0 locks the folder (returning the lock, held until closed), starts it
    (after an --overwrite, emptied), and removes dead writers' temporary files, shards' and
    merges' alike."""
    path = os.path.join(parts, SETTINGS)
    if rank:
        if not args.overwrite:
            same_settings(path, want, what)
        return None
    os.makedirs(parts, exist_ok=True)
    held = checkpoint.lock(parts, "--out", command)
    try:
        if args.overwrite:
            clear(parts)
        else:
            same_settings(path, want, what)
        for name in os.listdir(parts):
            if TMP in name:
                os.remove(os.path.join(parts, name))
        write_settings(path, want)
    except BaseException:
        held.close()
        raise
    return held


def clear(folder):
    """Removes everything in ``folder`` but its lock."""
    for name in os.listdir(folder):
        if name != checkpoint.LOCK:
            checkpoint.remove(os.path.join(folder, name))


def write_settings(path, want):
    _atomic(path, lambda f: f.write(json.dumps(want, indent=2).encode()))


def load(args, device):
    """``(model, config, path, tokenizer)`` of :func:`sample.load`, for class labels."""
    model, config, path, tok = sample.load(args, device)
    if checkpoint.condition_kind(config) == "prompts":
        raise UsageError(f"{path} is conditioned on text prompts; sample-many samples class "
                         "labels as the FID protocols do")
    return model, config, path, tok


def run(args, loaded=None):
    """The ``sample-many`` command; returns ``args.out`` on process 0, None on the others.
    ``loaded``: what :func:`load` gave for ``args`` on this process's device (a sweep
    samples one model at several scales), None to load it."""
    from .train import distributed, process_device

    check(args)
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = distributed(args.device)
    model, config, path, tok = loaded or load(args, process_device(args.device, rank, world))
    parts = parts_folder(args.out)
    held = prepare(args, parts, settings(args, model, config, path), rank)
    try:
        if held is not None and args.overwrite:
            checkpoint.remove(args.out)
        return _run(args, (model, config, path, tok), parts, rank, world, joined)
    finally:
        if held is not None:
            held.close()


def _run(args, loaded, parts, rank, world, joined):
    model, config, path, tok = loaded
    device = next(model.parameters()).device
    every = labels(config["num_classes"], args.n, args.per_class, args.seed)
    batches = [every[i:i + args.batch].numpy() for i in range(0, len(every), args.batch)]
    _barrier(world)
    kw = sample.recipe(sample.recipe_name(args, config["model"]), config["model"])
    autocast = torch.bfloat16 if precision(args) == "bf16" else None
    mine = list(range(rank, len(batches), world))
    bar = _Progress(sum(len(batches[i]) for i in mine), rank, world, not args.no_progress)
    new, busy, start = 0, 0.0, time.perf_counter()
    try:
        for i in mine:
            shard = shard_path(parts, i)
            if os.path.exists(shard):
                images, why = read_shard(shard, batches[i])
                if images is not None:
                    bar.update(len(images))
                    continue
                bar.write(f"redoing {shard}: {why}")
            t = time.perf_counter()
            generator = torch.Generator().manual_seed(batch_seed(args.seed, i))
            cond = torch.from_numpy(batches[i]).to(device)
            images = to_uint8(sample.generate(args, model, tok, cond, kw, generator, autocast))
            write_shard(shard, images, batches[i])
            busy += time.perf_counter() - t
            new += len(images)
            bar.update(len(images))
    finally:  # an error or Ctrl-C is reported below the bar, not inside it
        bar.close()
    _barrier(world)
    speeds = _gather((new, busy), world)
    shape = merge(parts, args.out, batches) if rank == 0 else None
    if world > 1 and not joined:
        torch.distributed.destroy_process_group()
    if rank:
        return None
    checkpoint.remove(parts)
    wall = time.perf_counter() - start
    done = sum(n for n, _ in speeds)
    rates = ", ".join(f"{n / t:.2f}" if t else "-" for n, t in speeds)
    print(f"wrote {args.out}: {shape[0]} images of {shape[1]}x{shape[2]} from {path}; {done} "
          f"sampled in this run, {wall:.1f} s wall ({done / wall:.2f} images/s); images/s per "
          f"process while sampling: {rates}")
    return args.out


class _Progress:
    """Process 0's bar (images/s); messages go below it."""

    def __init__(self, total, rank, world, show):
        self.bar = None
        if show and rank == 0:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, unit="img", desc="sample-many" + (
                f" (process 0 of {world})" if world > 1 else ""))

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def write(self, message):
        (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


def _gather(value, world):
    if world == 1:
        return [value]
    out = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out
