"""Training: AdamW with warmup + cosine decay, progress with loss and tokens/s, bf16
autocast on GPU, periodic atomic checkpoints, exact resume, and data-parallel training
under ``torchrun`` (gloo on CPU, NCCL on GPU).

Every random draw of a step (batch indices, orders, partitions, label drops) comes from one
generator for the *global* batch, and each process takes its slice: N processes on a global
batch follow the same trajectory as one process (up to floating-point reduction order).
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import checkpoint, data, orders


@dataclass
class TrainConfig:
    model: str = "sar"             # sar | randar | rar
    data: str = "digits"
    grid: int = 8
    dim: int = 128
    layers: int = 4                # SAR: this many encoder and this many decoder layers
    heads: int = 4
    batch: int = 64                # global batch (split across processes)
    steps: int = 1000
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 50
    class_dropout: float = 0.1
    dropout: float = 0.0
    sar_schedule: str = "random"   # SAR training partitions (see SARTransformer)
    rar_anneal: tuple = (0.25, 0.75)  # RAR: random-order ratio 1 -> 0 over these fractions
    seed: int = 0
    ckpt_every: int = 250
    out: str = "runs/run"
    device: str = "cpu"


def build_model(cfg, tokenizer, num_classes):
    common = dict(vocab_size=tokenizer.vocab_size, num_classes=num_classes,
                  grid_size=tokenizer.grid_size, dim=cfg.dim, n_head=cfg.heads,
                  multiple_of=32, class_dropout=cfg.class_dropout, dropout=cfg.dropout)
    if cfg.model == "sar":
        return checkpoint.MODELS["sar"](encoder_layers=cfg.layers, decoder_layers=cfg.layers,
                                        train_schedule=cfg.sar_schedule, **common)
    if cfg.model in ("randar", "rar"):
        return checkpoint.MODELS[cfg.model](n_layer=cfg.layers, token_dropout=cfg.dropout, **common)
    raise ValueError(f"--model must be sar, randar or rar, got {cfg.model!r}")


class _Loss(nn.Module):
    """The model's loss as a forward, so DistributedDataParallel can hook it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, labels, layout):
        return self.model.loss(tokens, labels, layout)


def lr_factor(step, warmup, total):
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _distributed(device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def train(cfg, resume=False, progress=True, log=print):
    """Trains (or resumes) the run in ``cfg.out``; returns the final checkpoint directory."""
    rank, world = _distributed(cfg.device)
    if cfg.batch % world:
        raise ValueError(f"--batch {cfg.batch} must split evenly over {world} processes")
    device = cfg.device
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    dataset = data.load(cfg.data, cfg.grid, "train")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset.tokenizer, dataset.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume:
        step_dir = checkpoint.resolve(cfg.out)
        loaded, _, _ = checkpoint.load(step_dir, device)
        model.load_state_dict(loaded.state_dict())
        state = checkpoint.load_train_state(step_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        if rank == 0:
            log(f"resumed {step_dir} at step {start}")
    step_model = _Loss(model)
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(step_model)
    config = {"model": cfg.model, "model_config": model.config,
              "tokenizer": dataset.tokenizer.config(), "num_classes": dataset.num_classes,
              "train": asdict(cfg)}
    local = cfg.batch // world
    shard = slice(rank * local, (rank + 1) * local)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", dynamic_ncols=True)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda"))
    model.train()
    final = None
    for step in range(start, cfg.steps):
        tic = time.perf_counter()
        index = torch.randint(0, len(dataset), (cfg.batch,), generator=gen)
        if cfg.model == "rar":
            ratio = orders.rar_ratio(step, cfg.rar_anneal[0] * cfg.steps, cfg.rar_anneal[1] * cfg.steps)
            layout = model.training_layout(cfg.batch, gen, random_ratio=ratio)
        else:
            layout = model.training_layout(cfg.batch, gen)
        layout = {k: v[shard] for k, v in layout.items()}
        tokens, labels = dataset.tokens[index][shard].to(device), dataset.labels[index][shard].to(device)
        with autocast:
            loss = step_model(tokens, labels, layout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if bar is not None:
            rate = cfg.batch * tokens.shape[1] / (time.perf_counter() - tic)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}")
            bar.update()
        done = step + 1
        if rank == 0 and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            final = checkpoint.save(cfg.out, done, model, config, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": done})
    if bar is not None:
        bar.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return final or checkpoint.resolve(cfg.out)
