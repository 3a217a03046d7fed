"""Training: AdamW with warmup + cosine decay, progress with loss and tokens/s, bf16
autocast on GPU, periodic atomic checkpoints, exact resume, and data-parallel training
under ``torchrun`` (gloo on CPU, NCCL on GPU).

Every random draw of a step (batch indices, orders, partitions, label drops) comes from one
generator for the *global* batch, and each process takes its slice: N processes on a global
batch follow the same trajectory as one process (up to floating-point reduction order).
"""
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .. import ops, orders
from . import blas, checkpoint, data, outputs, prompts
from ..models import MODELS, Prompt
from ..models.sar import TRAIN_SCHEDULES


def _setting(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """One training run. Each field with a ``help`` is a ``train`` option (see :func:`option`);
    the help says what it means, in which unit."""
    model: str = _setting("sar", "architecture: sar, randar, rar or rar-official (the official "
                                 "RAR's)")
    data: str = _setting("digits", "'digits' (embedded) or a token folder written by "
                                   "'python -m sarkernels tokenize'")
    grid: int = _setting(8, "digits only: token grid side, 8 or 16 (16 upsamples to 256 tokens)")
    dim: int = _setting(128, "model width, channels")
    layers: int = _setting(4, "transformer blocks (SAR: this many encoder and this many decoder)")
    heads: int = _setting(4, "attention heads; dim / heads must be a multiple of 8 up to 256")
    batch: int = _setting(64, "global batch, images per step (split across processes)")
    steps: int = _setting(1000, "total optimizer steps of the run")
    lr: float = _setting(2e-3, "peak AdamW learning rate")
    weight_decay: float = _setting(0.05, "AdamW decoupled weight decay")
    warmup: int = _setting(50, "linear warmup, steps; a cosine decay to 0 follows until --steps")
    class_dropout: float = _setting(0.1, "probability of dropping a label or prompt (trains "
                                         "the unconditional branch that CFG needs), in [0, 1)")
    dropout: float = _setting(0.0, "dropout probability in the blocks, in [0, 1)")
    sar_schedule: str = _setting("random", "SAR only: how training splits an order into sets: "
                                           + ", ".join(TRAIN_SCHEDULES))
    sar_sets: str = _setting("all", "SAR only: sets per training image, drawn uniformly per "
                                    "image: all (1 to the token count), a count K, an "
                                    "inclusive range LO-HI or a list such as 4,8,16")
    seed: int = _setting(0, "seed of initialisation and of every random draw of training")
    ckpt_every: int = _setting(250, "write a checkpoint every this many steps (and at the end)")
    out: str = _setting("runs/run", "run folder: step-N/ checkpoints and 'latest'")
    device: str = _setting("cpu", "cpu, cuda or cuda:N")
    condition: str = _setting("labels", "labels (class labels) or prompts (digits only: one "
                                        "prompt per image from templates such as 'a handwritten "
                                        "seven', embedded by the [text] extra's MiniLM)")

    def validate(self):
        """Raises ValueError naming the first setting that cannot train (before any work)."""
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        for name in ("dim", "layers", "heads", "batch", "steps", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{option(name)} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        for name in ("warmup", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{option(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("class_dropout", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{option(name)} is a probability in [0, 1), got "
                                 f"{getattr(self, name)}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"--condition must be one of {', '.join(CONDITIONS)}, got "
                             f"{self.condition!r}")
        if self.condition == "prompts" and self.data != "digits":
            raise ValueError("--condition prompts writes its prompts from digit labels: it "
                             f"needs --data digits, got {self.data!r}")
        if self.sar_schedule not in TRAIN_SCHEDULES:
            raise ValueError(f"--sar-schedule must be one of {', '.join(TRAIN_SCHEDULES)}, "
                             f"got {self.sar_schedule!r}")
        counts = self.set_counts(self.grid ** 2 if self.data == "digits" else None)
        if self.sar_schedule == "mar" and counts is not None:
            raise ValueError(f"--sar-sets {self.sar_sets}: --sar-schedule mar trains one set "
                             "after a random prefix; leave --sar-sets at all")
        if self.dim % self.heads:
            raise ValueError(f"--dim {self.dim} must split evenly into --heads {self.heads}")
        # the kernels' head-size rule, asked of the op itself on shape-only tensors
        q = torch.empty(1, 1, 1, self.dim // self.heads, device="meta")
        sets = torch.zeros(1, 1, dtype=torch.long, device="meta")
        try:
            ops.set_attention(q, q, q, sets, sets)
        except ValueError as exc:
            raise ValueError(f"--dim {self.dim} / --heads {self.heads}: {exc}") from None
        check_device(self.device)


    def set_counts(self, n):
        """--sar-sets as a list of counts for ``n`` tokens (None: all), or ValueError naming
        the option (with ``n`` None, only its form)."""
        try:
            return orders.set_counts(self.sar_sets, n)
        except ValueError as exc:
            raise ValueError(f"--sar-sets: {exc}") from None


CONDITIONS = ("labels", "prompts")
# What --resume may change: everything else defines the run and comes from its checkpoint.
RESUMABLE = ("steps", "ckpt_every", "device")


def option(name):
    """The command-line option of a TrainConfig field: ``--class-dropout`` for ``class_dropout``."""
    return "--" + name.replace("_", "-")


def check_device(name):
    """A device this machine can train or sample on, or ValueError naming --device."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch "
                             f"{torch.__version__}); use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: sarkernels runs on cpu or cuda")


def build_model(cfg, tokenizer, num_classes, cond_dim=None):
    common = dict(vocab_size=tokenizer.vocab_size, num_classes=num_classes,
                  grid_size=tokenizer.grid_size, dim=cfg.dim, n_head=cfg.heads,
                  multiple_of=32, class_dropout=cfg.class_dropout, dropout=cfg.dropout,
                  cond_dim=cond_dim)
    if cfg.model == "sar":  # the options only SAR has
        common.update(train_schedule=cfg.sar_schedule,
                      train_steps=cfg.set_counts(tokenizer.grid_size ** 2))
    return MODELS[cfg.model].for_training(layers=cfg.layers, **common)


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


def distributed(device):
    """``(rank, world)``: joins torchrun's process group (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if dist.is_initialized():  # evaluate --cfg-sweep runs sample-many once per scale
        return dist.get_rank(), world
    # Before joining: dynamo, imported later (torch.device("meta") in checkpoint.load does),
    # keeps references to the group that then outlives destroy_process_group. Its gloo
    # threads then drop their last tensors during interpreter shutdown, which aborts the
    # process ("terminate called without an active exception") now and then.
    import torch._dynamo  # noqa: F401
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def process_device(device, rank, world):
    """Under torchrun, ``cuda`` is each process's own GPU (torchrun's LOCAL_RANK)."""
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    return device


def _comparable(settings):
    """Settings as JSON stores them (tuples become lists), for comparing with a saved run."""
    return json.loads(json.dumps(settings))


def resume_config(out, given):
    """The settings of the run in ``out`` (its newest checkpoint's), with ``given`` (a dict
    of explicitly passed settings) on top; :func:`train` refuses those --resume may not change."""
    saved = checkpoint.read_config(checkpoint.resolve(out))["train"]
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **given, "out": out})


def prepare_run(cfg, resume, overwrite):
    """Checks ``cfg.out`` before any work; returns ``(step_dir, train_state)`` to resume from,
    or ``(None, None)`` for a fresh run. Never modifies the folder."""
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite starts it over: pass one")
    if not resume:
        steps = checkpoint.step_folders(cfg.out)
        if steps and not overwrite:
            raise ValueError(f"--out {cfg.out} already holds a run (newest {steps[-1]}): pass "
                             "--resume to continue it or --overwrite to start over")
        return None, None
    step_dir = checkpoint.resolve(cfg.out)
    saved = checkpoint.read_config(step_dir)["train"]
    now = _comparable(asdict(cfg))
    changed = [f"{option(k)} {now[k]!r} (the run has {saved[k]!r})" for k in now
               if k not in RESUMABLE and k != "out" and k in saved and saved[k] != now[k]]
    if changed:
        raise ValueError(f"--resume continues {step_dir} as it was configured; it may change "
                         f"only {', '.join(map(option, RESUMABLE))}, not "
                         + "; ".join(changed))
    state = checkpoint.load_train_state(step_dir)
    done = state["step"]
    if cfg.steps <= done:
        raise ValueError(f"{step_dir} is at step {done}, so --steps {cfg.steps} leaves nothing "
                         f"to train: pass --steps greater than {done} to train further")
    return step_dir, state


def train(cfg, resume=False, overwrite=False, progress=True, log=print, bar_row=None):
    """Trains (or, with ``resume``, continues) the run in ``cfg.out``; returns the final
    checkpoint directory. An existing run is only replaced with ``overwrite``. Everything
    that can be checked is checked before any work (ValueError naming the setting).
    ``bar_row``: the terminal row of the progress bar, for runs that train side by side."""
    cfg.validate()
    step_dir, state = prepare_run(cfg, resume, overwrite)
    dataset = data.load(cfg.data, cfg.grid, "train")
    cfg.set_counts(dataset.tokenizer.grid_size ** 2)  # a token folder's length is known now
    rank, world = distributed(cfg.device)
    if cfg.batch % world:
        raise ValueError(f"--batch {cfg.batch} must split evenly over {world} processes")
    # before the run folder: a missing text extra must not leave an empty run behind
    encoder = prompts.TextEncoder() if cfg.condition == "prompts" else None
    with _run_folder(cfg.out, resume) if rank == 0 else contextlib.nullcontext():
        return _fit(cfg, dataset, step_dir, state, rank, world, progress, log, bar_row,
                    encoder)


@contextlib.contextmanager
def _run_folder(out, resume):
    """The run folder, locked for the block: the last check, and the first change to it."""
    outputs.folder(out)
    held = checkpoint.lock(out)
    try:
        if resume:
            checkpoint.remove_stale(out)
        else:
            checkpoint.new_run(out)
        yield
    finally:
        held.close()


def _diverged(cfg, step, loss, norm):
    newest = checkpoint.newest(cfg.out)
    kept = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written"
    return (f"training diverged at step {step}: the loss is {loss:g} and the gradient norm "
            f"{norm:g}, so the weights were neither updated nor saved; {kept}. --resume "
            f"would repeat the same steps: start over (--overwrite) with a --lr below {cfg.lr:g}")


def _fit(cfg, dataset, step_dir, state, rank, world, progress, log, bar_row, encoder):
    """The training loop of :func:`train`, from ``step_dir`` and its ``state`` (None: a
    fresh run); ``encoder``: the prompts' TextEncoder, or None."""
    resume = step_dir is not None
    device = process_device(cfg.device, rank, world)
    # MKL's conditions for run-to-run identical bits: a fixed thread count and no dynamic
    # adjustment of it; torch turns MKL's adjustment off only in set_num_threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset.tokenizer, dataset.num_classes,
                        None if encoder is None else encoder.dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume:
        loaded, _, _ = checkpoint.load(step_dir, device)
        model.load_state_dict(loaded.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        if rank == 0:
            log(f"resumed {step_dir} at step {start}")
            if state.get("threads", threads) != threads and not blas.STRICT:
                log(f"note: the run trained on {state['threads']} CPU threads and continues on "
                    f"{threads}; BLAS splits some products by the thread count, so the bits "
                    "may differ from a run that was never interrupted")
    step_model = _Loss(model)
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(step_model)
    config = {"model": cfg.model, "model_config": asdict(model.config),
              "tokenizer": dataset.tokenizer.config(), "num_classes": dataset.num_classes,
              "condition": checkpoint.condition_config(encoder), "train": asdict(cfg)}
    local = cfg.batch // world
    shard = slice(rank * local, (rank + 1) * local)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", dynamic_ncols=True,
                   position=bar_row)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda"))
    model.train()
    final = None
    try:
        for step in range(start, cfg.steps):
            tic = time.perf_counter()
            index = torch.randint(0, len(dataset), (cfg.batch,), generator=gen)
            layout = model.training_layout(cfg.batch, gen, progress=step / cfg.steps)
            layout = {k: v[shard] for k, v in layout.items()}
            tokens = dataset.tokens[index][shard].to(device)
            labels = dataset.labels[index]
            if encoder is not None:  # every process draws the global batch's prompts
                labels = encoder(prompts.draw(labels, gen))
                labels = Prompt(labels.embeddings[shard].to(device), labels.mask[shard].to(device))
            else:
                labels = labels[shard].to(device)
            with autocast:
                loss = step_model(tokens, labels, layout)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            # Before the step, so the weights stay finite; the norm is of the gradients every
            # process shares, so all stop together. The check costs a host sync per step.
            if not torch.isfinite(norm):
                raise ValueError(_diverged(cfg, step + 1, loss.item(), norm.item()))
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
                    "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "threads": threads, "step": done})
    finally:  # an error or Ctrl-C is reported below the bar, not inside it
        if bar is not None:
            bar.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return final or checkpoint.resolve(cfg.out)
