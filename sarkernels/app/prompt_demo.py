"""``python -m sarkernels demo --prompts``: the demo's SAR and RandAR trained on text
prompts instead of labels (``train --condition prompts``), judged like the class demo: does
the digit the judge reads match the one the prompt names?

Two prompt sets per model: the training templates, and phrasings training never saw (the
text encoder has to carry them to the digit). Writes ``prompt_samples.png`` (a row per
model and prompt set, columns 0-9), ``prompt_report.md`` and ``prompt_report.json``.
"""
import json
import os
import time

import torch

from . import checkpoint, prompts, sample
from .demo import prepare, train_all

UNSEEN = ("the handwritten number {word}", "digit {word}", "a {word} drawn by hand")
RECIPES = {"sar": "sar-ts", "randar": "randar-parallel"}


def prompt_set(templates, per_class):
    """``per_class`` prompts per digit, cycling through ``templates``; and their labels."""
    labels = torch.arange(10).repeat(per_class)
    texts = [prompts.fill(templates[i // 10 % len(templates)], int(l))
             for i, l in enumerate(labels)]
    return texts, labels


def run(out="demo_out", device="cpu", quick=False, cfg_scale=2.0, per_class=20, log=print):
    train_set, held_out, judge, cfgs = prepare(out, device, quick, cfg_scale, "prompts")
    encoder = prompts.TextEncoder()  # before minutes of training: fails fast without [text]
    tok = train_set.tokenizer
    per_class = 2 if quick else per_class
    sets = {"training templates": prompt_set(prompts.TEMPLATES, per_class),
            "unseen phrasings": prompt_set(UNSEEN, per_class)}
    report = {"device": device, "quick": quick, "cfg_scale": cfg_scale,
              "images": len(sets["unseen phrasings"][1]), "encoder": prompts.ENCODER,
              "templates": list(prompts.TEMPLATES), "unseen": list(UNSEEN), "models": {},
              "results": []}
    rows, titles = [], []
    for kind, (path, seconds) in train_all(cfgs, log).items():
        cfg = cfgs[kind]
        model = checkpoint.load(path, device)[0]
        report["models"][kind] = {"train_seconds": seconds,
                                  "steps": cfg.steps, "batch": cfg.batch, "dim": cfg.dim,
                                  "layers": cfg.layers,
                                  "parameters": sum(p.numel() for p in model.parameters())}
        for name, (texts, labels) in sets.items():
            tic = time.perf_counter()
            tokens = model.generate(encoder(texts), cfg_scale=cfg_scale,
                                    generator=torch.Generator().manual_seed(0),
                                    **sample.recipe(RECIPES[kind], kind)).cpu()
            seconds = time.perf_counter() - tic
            images = tok.decode(tokens)
            result = {"model": kind, "recipe": RECIPES[kind], "prompts": name,
                      "accuracy": judge.accuracy(images, labels),
                      "frechet": judge.frechet(images, tok.decode(held_out.tokens)),
                      "images_per_second": len(labels) / seconds}
            report["results"].append(result)
            rows.append([images[c] for c in range(10)])
            titles.append(f"{kind}: {name}")
            log(f"{kind:>6} {name:<18} accuracy {result['accuracy']:.3f}  "
                f"Frechet {result['frechet']:.1f}")
    sample.image_grid(rows, os.path.join(out, "prompt_samples.png"), row_titles=titles,
                      col_titles=list(range(10)))
    with open(os.path.join(out, "prompt_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "prompt_report.md"), "w") as f:
        f.write(markdown(report))
    return report


def markdown(r):
    lines = [f"# sarkernels prompt demo ({'quick' if r['quick'] else 'full'}, {r['device']})", "",
             f"{r['images']} images per row (digits 0-9 equally), CFG scale {r['cfg_scale']}, "
             f"prompts embedded per token by {r['encoder']}. Training templates: "
             + "; ".join(f"'{t}'" for t in r["templates"]) + ". Unseen phrasings: "
             + "; ".join(f"'{t}'" for t in r["unseen"]) + ".", "",
             "| model | recipe | prompts | accuracy (judge) | Frechet | images/s |",
             "|---|---|---|---|---|---|"]
    for x in r["results"]:
        lines.append(f"| {x['model']} | {x['recipe']} | {x['prompts']} | {x['accuracy']:.1%} | "
                     f"{x['frechet']:.1f} | {x['images_per_second']:.1f} |")
    lines += ["", "| model | parameters | train steps | batch | train seconds |",
              "|---|---|---|---|---|"]
    for kind, m in r["models"].items():
        lines.append(f"| {kind} | {m['parameters']:,} | {m['steps']} | {m['batch']} | "
                     f"{m['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"
