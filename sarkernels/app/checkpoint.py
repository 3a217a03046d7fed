"""Checkpoints: ``RUN/step-NNNNNN/`` holds ``model.safetensors``, ``config.json`` and
``train_state.pt`` (optimizer, scheduler, RNG, step); ``RUN/latest`` names the newest.
Each step directory is written under a temporary name and renamed into place, and
``latest`` is replaced atomically, so an interrupted run never leaves a truncated
checkpoint behind a name."""
import json
import os
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import tokenizers
from ..models import MODELS
from .prompts import ENCODER

KEEP = 2


class CheckpointError(ValueError):
    """A checkpoint path that is missing, corrupt or does not match its config."""


def save(run_dir, step, model, config, train_state=None):
    final = os.path.join(run_dir, f"step-{step:06d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({**config, "step": step}, f, indent=2)
    if train_state is not None:
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = os.path.join(run_dir, f"latest.tmp-{os.getpid()}")
    with open(latest_tmp, "w") as f:
        f.write(os.path.basename(final))
    os.replace(latest_tmp, os.path.join(run_dir, "latest"))
    for old in step_folders(run_dir)[:-KEEP]:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)
    return final


def step_folders(run_dir):
    """Names of the run's ``step-N`` folders, oldest first (none for a missing folder)."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(d for d in os.listdir(run_dir) if d.startswith("step-") and ".tmp-" not in d
                  and os.path.isdir(os.path.join(run_dir, d)))


def new_run(run_dir):
    """An empty run folder: removes an earlier run's checkpoints, half-written ones and
    ``latest``; other files stay."""
    os.makedirs(run_dir, exist_ok=True)
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith("step-"):
            shutil.rmtree(path, ignore_errors=True)
        elif name == "latest" or name.startswith("latest.tmp-"):
            os.remove(path)


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
            named = os.path.join(path, f.read().strip())
        if _complete(named):
            return named
    complete = [d for d in step_folders(path) if _complete(os.path.join(path, d))]
    if complete:
        return os.path.join(path, complete[-1])
    raise CheckpointError(f"{path!r} is not a sarkernels checkpoint: no model.safetensors and "
                          "config.json in it or in a step-N folder")


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


def load_weights(model, state, what, against="its config"):
    """``model.load_state_dict(state, strict=True)``, with a short message naming a few of
    the missing, unexpected and mis-shaped keys (torch lists them all on one line)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {kind} (e.g. {', '.join(keys[:2])})"
                for kind, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("of another shape", shapes)) if keys]
    if problems:
        raise CheckpointError(f"{what}: weights do not match {against}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def load(path, device="cpu"):
    """Returns ``(model, config, step_dir)``, the model in eval mode on ``device``."""
    path = resolve(path)
    config = read_config(path)
    try:
        model = MODELS[config["model"]](**config["model_config"])
        tokenizers.from_config(config["tokenizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}/config.json is corrupt or unknown: {exc}") from None
    try:
        state = load_file(os.path.join(path, "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}/model.safetensors is corrupt: {exc}") from None
    load_weights(model, state, path)
    return model.to(device).eval(), config, path


def load_official(path, kind="randar", n_head=16, grid_size=16, device="cpu"):
    """An official RandAR ``.safetensors`` state_dict (or one with its key pattern): width,
    depth, vocabulary, classes and FFN size are read from the tensors; ``n_head`` comes from
    the preset (L: 16, XL: 20, XXL: 24)."""
    try:
        state = load_file(path)
    except (SafetensorError, OSError, FileNotFoundError) as exc:
        raise CheckpointError(f"{path!r} is not a readable safetensors file: {exc}") from None
    try:
        vocab, dim = state["tok_embeddings.weight"].shape
        classes = state["cls_embedding.embedding_table.weight"].shape[0] - 1
        n_layer = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        hidden = state["layers.0.feed_forward.w1.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path!r} does not have RandAR's key pattern ({exc})") from None
    from ..nn import find_multiple
    multiple = next((m for m in (256, 128, 64, 32, 16, 8, 1)
                     if find_multiple(int(2 * 4 * dim / 3), m) == hidden), None)
    if multiple is None or dim % n_head:
        raise CheckpointError(f"{path!r}: FFN size {hidden} or width {dim} does not fit "
                              f"{n_head} heads of a LlamaGen block")
    model = MODELS[kind](vocab_size=vocab, num_classes=classes, grid_size=grid_size, dim=dim,
                         n_layer=n_layer, n_head=n_head, multiple_of=multiple)
    load_weights(model, state, repr(path), "the architecture its tensors imply")
    return model.to(device).eval()


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
