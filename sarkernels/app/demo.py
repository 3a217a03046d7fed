"""``python -m sarkernels demo``: train a small SAR and a small RandAR on the embedded
digits, sample them with several recipes, and measure what each recipe costs and buys.

Writes ``samples.png`` (a row per recipe, columns 0-9), ``inpainting.png`` (left half
kept, right half generated), ``report.md`` and ``report.json`` into the output folder.
"""
import concurrent.futures
import json
import multiprocessing
import os
import time

import torch

from . import checkpoint, data, metrics, outputs, sample
from ..models.common import check_sampling
from .train import TrainConfig, check_device, train

SAR_SETS = (4, 8, 16, 32, 64)  # the speed/quality trade-off: SAR-TS with this many sets
# The SAR trains for exactly the set counts it is sampled with (train --sar-sets): K drawn
# from 1..64, a fixed 16 or 4-16 stayed near 80% class accuracy at every count, these five
# counts reached 91-97% at 1500-1800 steps (benchmarks/RESULTS.md, "SAR's training set counts").
SAR_TRAIN_SETS = ",".join(map(str, SAR_SETS))
# (model, recipe, set count or None for the recipe's own) of the report, in row order
ROWS = [("sar", "ar", None), *[("sar", "sar-ts", k) for k in SAR_SETS], ("sar", "mar", None),
        ("randar", "randar-parallel", None), ("randar", "randar-ar", None)]
# Sized to train side by side in under five minutes on two CPU cores (train_all); the
# RandAR, slower per step, is the one that sets the time.
MODELS = {
    "sar": dict(dim=96, layers=2, steps=1550, batch=32, lr=5e-3, sar_sets=SAR_TRAIN_SETS),
    "randar": dict(dim=96, layers=3, steps=1400, batch=32, lr=5e-3),
}
QUICK = dict(steps=30, ckpt_every=15)


def prepare(out, device, quick, cfg_scale, condition="labels"):
    """What the demos do before training: the checks (before minutes of training, not
    after), the output folder, the digits' training and held-out splits, the judge trained
    on the former, and a training config per model kind (runs in ``out/runs``)."""
    check_sampling(1.0, 0, 1.0, cfg_scale)
    check_device(device)
    outputs.folder(out)
    torch.manual_seed(0)
    train_set, held_out = data.digits(8, "train"), data.digits(8, "held_out")
    judge = metrics.DigitsJudge(train_set.tokenizer.decode(train_set.tokens), train_set.labels)
    suffix = "" if condition == "labels" else f"-{condition}"
    cfgs = {kind: TrainConfig(model=kind, device=device, condition=condition,
                              out=os.path.join(out, "runs", kind + suffix),
                              **{**size, **(QUICK if quick else {})})
            for kind, size in MODELS.items()}
    return train_set, held_out, judge, cfgs


def run(out="demo_out", device="cpu", quick=False, cfg_scale=2.0, per_class=20, log=print):
    train_set, held_out, judge, cfgs = prepare(out, device, quick, cfg_scale)
    tok = train_set.tokenizer
    per_class = 2 if quick else per_class
    labels = torch.arange(10).repeat(per_class)
    real = tok.decode(train_set.tokens[:len(labels)])
    report = {"device": device, "quick": quick, "cfg_scale": cfg_scale, "images": len(labels),
              "judge_held_out_accuracy": judge.accuracy(tok.decode(held_out.tokens), held_out.labels),
              "real_floor_frechet": judge.frechet(real, tok.decode(held_out.tokens)),
              "models": {}, "recipes": []}
    models = {}
    for kind, (path, seconds) in train_all(cfgs, log).items():
        cfg = cfgs[kind]
        models[kind] = checkpoint.load(path, device)[0]
        report["models"][kind] = {"train_seconds": seconds, "checkpoint": path,
                                  "parameters": sum(p.numel() for p in models[kind].parameters()),
                                  "steps": cfg.steps, "batch": cfg.batch, "dim": cfg.dim,
                                  "layers": cfg.layers,
                                  "train_sets": cfg.sar_sets if kind == "sar" else None}
    first_of_class = []
    for kind, name, sets in ROWS:
        kw = sample.recipe(name, kind)
        description = sample.RECIPES[name][2]
        if sets is not None:
            kw["steps"] = sets
            description = f"SAR-TS: random order, {sets} sets of random sizes"
        gen = torch.Generator().manual_seed(0)
        tic = time.perf_counter()
        steps = []
        tokens = models[kind].generate(labels.to(device), cfg_scale=cfg_scale, generator=gen,
                                       on_step=lambda s, l, c: steps.append(s), **kw).cpu()
        seconds = time.perf_counter() - tic
        images = tok.decode(tokens)
        report["recipes"].append({
            "model": kind, "recipe": name, "description": description,
            "steps": max(steps) + 1, "seconds_per_image": seconds / len(labels),
            "images_per_second": len(labels) / seconds,
            "class_accuracy": judge.accuracy(images, labels),
            "frechet": judge.frechet(images, tok.decode(held_out.tokens))})
        first_of_class.append([images[c] for c in range(10)])
        log(f"{kind:>6} {name:<16} steps {max(steps) + 1:>3}  {len(labels) / seconds:7.1f} img/s  "
            f"accuracy {report['recipes'][-1]['class_accuracy']:.3f}  "
            f"Frechet {report['recipes'][-1]['frechet']:.1f}")
    sample.image_grid(first_of_class, os.path.join(out, "samples.png"),
                      row_titles=[f"{k}:{n}" + (f" {s}" if s else "") for k, n, s in ROWS],
                      col_titles=list(range(10)))
    report["inpainting"] = inpaint(models, held_out, judge, out, device, cfg_scale)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))
    return report


def train_all(cfgs, log=print):
    """Trains each config (a fresh run, replacing one in its folder); returns ``{kind:
    (checkpoint, seconds)}``. On a CPU with threads to share, the runs go side by side in
    processes of an equal share of the threads each: a step of these small models keeps
    one core busy better than two (benchmarks/RESULTS.md, "demo")."""
    threads = torch.get_num_threads() // len(cfgs)
    if threads < 1 or any(cfg.device != "cpu" for cfg in cfgs.values()):
        return {kind: _train_one(cfg, None, None, log) for kind, cfg in cfgs.items()}
    spawn = multiprocessing.get_context("spawn")  # forking a process that ran OpenMP hangs
    with concurrent.futures.ProcessPoolExecutor(len(cfgs), mp_context=spawn) as pool:
        futures = {kind: pool.submit(_train_one, cfg, threads, row)
                   for row, (kind, cfg) in enumerate(cfgs.items())}
        return {kind: future.result() for kind, future in futures.items()}


def _train_one(cfg, threads, bar_row, log=print):
    if threads is not None:
        torch.set_num_threads(threads)
    tic = time.perf_counter()
    path = train(cfg, overwrite=True, log=log, bar_row=bar_row)
    return path, time.perf_counter() - tic


def inpaint(models, held_out, judge, out, device, cfg_scale):
    """Keep the left half of one held-out digit per class, generate the right half."""
    tok = held_out.tokenizer
    index = torch.stack([(held_out.labels == c).nonzero()[0, 0] for c in range(10)])
    originals, labels = held_out.tokens[index], held_out.labels[index]
    keep = sample.half_mask("left", tok.grid_size)
    positions = keep.nonzero().flatten()
    known = (positions.expand(10, -1), originals[:, positions])
    rows = [tok.decode(originals), tok.decode(torch.where(keep, originals, 0))]
    titles, accuracy = ["original", "left half kept"], {}
    for kind, name in (("sar", "sar-ts"), ("randar", "randar-parallel")):
        tokens = models[kind].generate(labels.to(device), known=known, cfg_scale=cfg_scale,
                                       generator=torch.Generator().manual_seed(1),
                                       **sample.recipe(name, kind)).cpu()
        assert torch.equal(tokens[:, positions], originals[:, positions])
        rows.append(tok.decode(tokens))
        titles.append(f"{kind}:{name}")
        accuracy[f"{kind}:{name}"] = judge.accuracy(rows[-1], labels)
    sample.image_grid([list(r) for r in rows], os.path.join(out, "inpainting.png"),
                      row_titles=titles, col_titles=list(range(10)))
    return {"class_accuracy": accuracy}


def markdown(r):
    lines = [f"# sarkernels demo ({'quick' if r['quick'] else 'full'}, {r['device']})", "",
             f"{r['images']} images per recipe (labels 0-9 equally), CFG scale {r['cfg_scale']}. "
             f"Judge: an MLP on real training digits, {r['judge_held_out_accuracy']:.1%} on "
             f"held-out real digits. Frechet distance to the held-out set in the judge's "
             f"hidden features; real training digits score {r['real_floor_frechet']:.1f} "
             "(the floor).", "",
             "| model | recipe | steps | s / image | images/s | class accuracy | Frechet |",
             "|---|---|---|---|---|---|---|"]
    for x in r["recipes"]:
        lines.append(f"| {x['model']} | {x['description']} | {x['steps']} | "
                     f"{x['seconds_per_image']:.4f} | {x['images_per_second']:.1f} | "
                     f"{x['class_accuracy']:.1%} | {x['frechet']:.1f} |")
    lines += ["", "| model | parameters | train steps | batch | SAR sets per training image | "
              "train seconds |", "|---|---|---|---|---|---|"]
    for kind, m in r["models"].items():
        sets = "-" if m["train_sets"] is None else m["train_sets"]
        lines.append(f"| {kind} | {m['parameters']:,} | {m['steps']} | {m['batch']} | {sets} | "
                     f"{m['train_seconds']:.0f} |")
    acc = r["inpainting"]["class_accuracy"]
    lines += ["", "Inpainting (left half kept): class accuracy "
              + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()), ""]
    return "\n".join(lines)
