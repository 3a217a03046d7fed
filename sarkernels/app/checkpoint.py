"""Checkpoints: ``RUN/step-NNNNNN/`` holds ``model.safetensors``, ``config.json`` and
``train_state.pt`` (optimizer, scheduler, RNG, step); ``RUN/latest`` names the newest.
Each step directory is written under a temporary name and renamed into place, and
``latest`` is replaced atomically, so an interrupted run never leaves a truncated
checkpoint behind a name; a write that fails (a full disk, Ctrl-C, SIGTERM) removes its
temporary files. ``RUN/.lock`` is held while a process trains into the run."""
import fcntl
import json
import math
import os
import re
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import tokenizers
from ..models import MODELS
from .prompts import ENCODER

KEEP = 2
STEP = re.compile(r"step-\d+")
TMP = ".tmp-"
LOCK = ".lock"


class CheckpointError(ValueError):
    """A checkpoint path that is missing, corrupt or does not match its config."""


def save(run_dir, step, model, config, train_state=None):
    final = os.path.join(run_dir, f"step-{step:06d}")
    tmp = f"{final}{TMP}{os.getpid()}"
    latest_tmp = os.path.join(run_dir, f"latest{TMP}{os.getpid()}")
    remove(tmp)  # a dead process's, when this pid is a reused one
    try:
        os.makedirs(tmp)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**config, "step": step}, f, indent=2)
        if train_state is not None:
            torch.save(train_state, os.path.join(tmp, "train_state.pt"))
        with open(latest_tmp, "w") as f:
            f.write(os.path.basename(final))
        remove(final)
        os.replace(tmp, final)
        os.replace(latest_tmp, os.path.join(run_dir, "latest"))
    except BaseException as exc:  # a half-written checkpoint would keep a full disk full
        remove(tmp)
        remove(latest_tmp)
        # torch.save reports a failed write as a RuntimeError, safetensors as its own error
        if isinstance(exc, (OSError, RuntimeError, SafetensorError)):
            raise CheckpointError(_unwritable(run_dir, final, exc)) from None
        raise
    for old in step_folders(run_dir)[:-KEEP]:
        remove(os.path.join(run_dir, old))
    return final


def _unwritable(run_dir, final, exc):
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "a write failed"
    free = shutil.disk_usage(run_dir).free
    kept = newest(run_dir)
    kept = f"the newest checkpoint is still {kept}" if kept else "no earlier checkpoint was written"
    return f"cannot write checkpoint {final} ({why}): {free / 2**20:.1f} MiB free there; {kept}"


def remove(path):
    """Removes a file, a folder tree, or a link (never what it points to)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def step_folders(run_dir):
    """Names of the run's ``step-N`` folders, oldest first (none for a missing folder)."""
    if not os.path.isdir(run_dir):
        return []
    # a link is not the run's own checkpoint: resolve() must never follow one out of the run
    return sorted(d for d in os.listdir(run_dir) if STEP.fullmatch(d)
                  and os.path.isdir(os.path.join(run_dir, d))
                  and not os.path.islink(os.path.join(run_dir, d)))


def new_run(run_dir):
    """An empty run folder: removes an earlier run's checkpoints (a link: the link),
    half-written ones and ``latest``; other files stay."""
    os.makedirs(run_dir, exist_ok=True)
    remove_stale(run_dir)
    for name in os.listdir(run_dir):
        if STEP.fullmatch(name) or name == "latest":
            remove(os.path.join(run_dir, name))


def remove_stale(run_dir):
    """Removes the temporary files of checkpoints whose writer died (a kill -9, a power
    cut). Call it holding :func:`lock`: then no live process is writing them."""
    for name in os.listdir(run_dir):
        if TMP in name and (name.startswith("step-") or name.startswith("latest")):
            remove(os.path.join(run_dir, name))


def lock(run_dir, option="--out", command="train"):
    """Holds ``RUN/.lock`` until the returned file is closed, or raises CheckpointError
    naming the process that holds it: two runs into one folder would replace each other's
    checkpoints (or, for ``command`` sample-many, shards). The kernel drops the lock when
    the process ends, a crash included."""
    f = open(os.path.join(run_dir, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise CheckpointError(f"{option} {run_dir} is in use by another {command} (pid "
                              f"{holder}): wait for it to finish, or pass another {option}") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def _complete(path):
    return all(os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", "config.json"))


def resolve(path):
    """A step directory, or a run directory: the step its ``latest`` names, or the newest
    complete step folder when ``latest`` is missing or names a removed one."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isfile(path) and os.path.basename(path) == "model.safetensors":
        path = os.path.dirname(path) or "."  # a step folder's weights: the step folder
    if _complete(path):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        if not STEP.fullmatch(name):
            raise CheckpointError(f"{latest} names {name!r}, not a step-N folder of the run: "
                                  "delete it to use the newest step folder")
        if name in step_folders(path) and _complete(os.path.join(path, name)):
            return os.path.join(path, name)
    complete = [d for d in step_folders(path) if _complete(os.path.join(path, d))]
    if complete:
        return os.path.join(path, complete[-1])
    raise CheckpointError(f"{path!r} is not a sarkernels checkpoint: no model.safetensors and "
                          "config.json in it or in a step-N folder")


def newest(run_dir):
    """The checkpoint a ``--resume`` of ``run_dir`` continues from, or None."""
    try:
        return resolve(run_dir)
    except CheckpointError:
        return None


def read_config(step_dir):
    """A checkpoint's ``config.json``."""
    try:
        with open(os.path.join(step_dir, "config.json")) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{step_dir}/config.json is corrupt: {exc}") from None
    missing = [k for k in ("model", "model_config", "tokenizer", "num_classes")
               if not isinstance(config, dict) or k not in config]
    if missing:
        raise CheckpointError(f"{step_dir}/config.json is not a sarkernels config "
                              f"(no {missing[0]!r})")
    return config


def condition_config(encoder=None):
    """What a run is conditioned on, as ``config.json`` records it: class labels, or prompts
    through ``encoder`` (a :class:`~sarkernels.app.prompts.TextEncoder`)."""
    if encoder is None:
        return {"kind": "labels"}
    return {"kind": "prompts", "encoder": ENCODER, "dim": encoder.dim}


def condition_kind(config):
    """``"labels"`` or ``"prompts"``; checkpoints from before prompts have labels."""
    return config.get("condition", {"kind": "labels"})["kind"]


def check_weights(model, shapes, what, against="its config"):
    """Raises CheckpointError unless ``shapes`` (name -> shape of each tensor of a state
    dict) are ``model``'s, naming a few of the missing, unexpected and mis-shaped keys
    (torch's load_state_dict lists them all on one line)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = [f"{k} {list(shapes[k])} vs {list(v.shape)}" for k, v in expected.items()
                  if k in shapes and list(shapes[k]) != list(v.shape)]
    problems = [f"{len(keys)} {kind} (e.g. {', '.join(keys[:2])})"
                for kind, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("of another shape", mismatched)) if keys]
    if problems:
        raise CheckpointError(f"{what}: weights do not match {against}: {'; '.join(problems)}")


def _check_config(model, tokenizer, config, path):
    """The model a config.json describes against its own tokenizer and class count."""
    pairs = [("grid side", model.grid_size, "tokenizer", tokenizer.grid_size),
             ("vocabulary", model.vocab_size, "tokenizer", tokenizer.vocab_size),
             ("class count", model.num_classes, "num_classes", config["num_classes"])]
    for what, ours, where, theirs in pairs:
        if ours != theirs:
            raise CheckpointError(f"{path}/config.json is inconsistent: the model's {what} is "
                                  f"{ours} but its {where} says {theirs}")


def load(path, device="cpu"):
    """Returns ``(model, config, step_dir)``, the model in eval mode on ``device``."""
    path = resolve(path)
    config = read_config(path)
    build = lambda: MODELS[config["model"]](**config["model_config"])
    try:
        # shapes only: a config edited to an absurd size fails here or against the weights,
        # before anything of that size is allocated
        with torch.device("meta"):
            shape_only = build()
        tokenizer = tokenizers.from_config(config["tokenizer"])
    except (KeyError, TypeError, ValueError, RuntimeError, ArithmeticError) as exc:
        raise CheckpointError(f"{path}/config.json is corrupt or unknown: {exc}") from None
    _check_config(shape_only, tokenizer, config, path)
    try:
        state = load_file(os.path.join(path, "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}/model.safetensors is corrupt: {exc}") from None
    check_weights(shape_only, {k: v.shape for k, v in state.items()}, path)
    model = build()
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), config, path


def load_official(path, kind="randar", n_head=None, grid_size=None, device="cpu"):
    """Official weights (a state_dict in a ``.safetensors`` file or a torch ``.bin``/``.pt``,
    read with ``weights_only=True``) as a model in eval mode on ``device``: ``kind``
    "randar" (RandAR, :func:`official_model`) or "rar" (RAR's ``rar_b.bin`` ..
    ``rar_xxl.bin``)."""
    model = official_model(read_weights(path), kind, n_head, grid_size, repr(path))
    return model.to(device).eval()


def read_weights(path):
    """The state_dict (name -> tensor) in ``path``: safetensors, or torch's format read
    with ``weights_only=True``."""
    try:
        state = tokenizers.read_state(path, "weights file (.safetensors, or a torch .bin/.pt)")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path!r} does not hold a state_dict (names -> tensors)")
    return state


def official_model(state, kind="randar", n_head=None, grid_size=None, what="the weights"):
    """The model ``state`` (official keys) loads into strictly, its architecture read from
    the tensors; built on the meta device and given ``state``'s tensors, so a state on
    the meta device gives a shape-only model. RandAR: width, depth, vocabulary, classes and
    FFN size from the tensors, ``n_head`` (default 16: L; XL 20, XXL 24) and ``grid_size``
    (default 16) given. RAR: everything from the tensors; ``n_head`` and ``grid_size``, when
    given, must agree with them."""
    if kind not in ("randar", "rar"):
        raise ValueError(f"kind must be 'randar' or 'rar', got {kind!r}")
    try:
        sizes = _rar_sizes(state) if kind == "rar" else _randar_sizes(state, n_head or 16)
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{what} does not have {'RAR' if kind == 'rar' else 'RandAR'}'s "
                              f"official key pattern ({type(exc).__name__}: {exc})") from None
    if kind == "rar":
        for name, given in (("n_head", n_head), ("grid_size", grid_size)):
            if given is not None and given != sizes[name]:
                raise CheckpointError(f"{what}: {name} {given} was asked for, but the tensors "
                                      f"hold a RAR with {name} {sizes[name]}")
        cls = MODELS["rar-official"]
        # an official size samples with its README's guidance power; others keep rar.yaml's
        official = next((v for v in cls.config_class.PRESETS.values()
                         if all(sizes[k] == x for k, x in v.items() if k != "cfg_power")), {})
        sizes.update({k: v for k, v in official.items() if k == "cfg_power"})
    else:
        cls, sizes["grid_size"] = MODELS[kind], grid_size or 16
    with torch.device("meta"):  # the tensors become the parameters: no second copy
        model = cls(**sizes)
    check_weights(model, {k: v.shape for k, v in state.items()}, what,
                  "the architecture its tensors imply")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _randar_sizes(state, n_head):
    from ..nn import find_multiple

    vocab, dim = state["tok_embeddings.weight"].shape
    classes = state["cls_embedding.embedding_table.weight"].shape[0] - 1
    n_layer = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    multiple = next((m for m in (256, 128, 64, 32, 16, 8, 1)
                     if find_multiple(int(2 * 4 * dim / 3), m) == hidden), None)
    if multiple is None or dim % n_head:
        raise ValueError(f"FFN size {hidden} or width {dim} does not fit {n_head} heads of a "
                         "LlamaGen block")
    return dict(vocab_size=vocab, num_classes=classes, dim=dim, n_layer=n_layer, n_head=n_head,
                multiple_of=multiple)


def _rar_sizes(state):
    """The official RAR's sizes from its tensors (see ``shared/reference/rar.md``)."""
    from ..models.rar_official import POSITION_SPARE

    vocab, dim = state["lm_head.weight"].shape
    n_tokens = state["pos_embed"].shape[1] - POSITION_SPARE
    grid = math.isqrt(max(n_tokens, 0))
    if grid * grid != n_tokens or grid == 0:
        raise ValueError(f"pos_embed holds {n_tokens} token rows, not a square grid's")
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    if dim % head_dim:
        raise ValueError(f"width {dim} is no multiple of the head size {head_dim}")
    return dict(vocab_size=vocab, num_classes=state["embeddings.weight"].shape[0] - vocab - 2,
                grid_size=grid, dim=dim, n_head=dim // head_dim,
                n_layer=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
                intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0])


def load_train_state(step_dir):
    path = os.path.join(step_dir, "train_state.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{step_dir} has no train_state.pt: cannot resume from it")
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # any unpickling failure means a corrupt file
        # torch's message is several lines of weights_only advice that does not apply here
        raise CheckpointError(f"{path} is corrupt or not written by sarkernels "
                              f"({type(exc).__name__})") from None
