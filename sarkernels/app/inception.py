"""The ADM suite's feature network: TensorFlow's Inception-v3 graph of 2015-12-05 as
torch-fidelity ports it (the 299x299 TF1 bilinear resize included), giving the pool
features (FID, precision, recall), the unbiased logits (Inception Score) and the spatial
features of sFID (ADM's ``mixed_6/conv``, first 7 channels: here Mixed_6d's 1x1 branch)."""
import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import torch

from .cli_args import UsageError

WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
SPATIAL_CHANNELS = 7


def _extractor_module():
    """torch-fidelity's Inception module alone. Its package ``__init__`` imports torchvision
    (for datasets and other networks, unused here), and no CPU build of torchvision that
    matches torch may be installable (PyPI's is linked against CUDA libraries): so the
    package is entered without running its ``__init__``, and then forgotten, so that a
    later ``import torch_fidelity`` runs it as usual."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise UsageError("evaluate --features inception needs torch-fidelity: pip install "
                         "--no-deps torch-fidelity==0.4.0 (make test installs it)")
    bare = "torch_fidelity" not in sys.modules
    if bare:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module(name)
    finally:
        if bare:
            del sys.modules["torch_fidelity"]


def weights_path(given=None):
    """``given`` (``--inception-weights``), or where torch-fidelity downloads them (torch
    hub's checkpoints folder); a one-line error saying how to get them when absent."""
    path = given or os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS)
    if not os.path.isfile(path):
        url = _extractor_module().URL_INCEPTION_V3
        where = f"--inception-weights {given!r} does not exist" if given else \
            f"no Inception weights at {path}"
        raise UsageError(f"{where}: download {url} to {path} (or anywhere, and pass "
                         "--inception-weights FILE)")
    try:  # torch-fidelity unpickles with weights_only=False: only a plain state_dict passes
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise UsageError(f"Inception weights {path} are corrupt or not a state_dict "
                         f"({type(exc).__name__})") from None
    return path


class Inception:
    """``features(images)``: a dict of pool ``[N, 2048]``, logits ``[N, 1008]`` and
    spatial ``[N, 2023]`` float32 arrays for uint8 images ``[N, H, W, 3]``."""

    def __init__(self, weights=None, device="cpu", batch=50):
        module = _extractor_module()
        path = weights_path(weights)
        try:
            self.net = module.FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"],
                feature_extractor_weights_path=path).to(device)
        except RuntimeError as exc:  # load_state_dict: another network's keys or shapes
            raise UsageError(f"Inception weights {path} do not fit torch-fidelity's "
                             f"Inception-v3: {str(exc).splitlines()[0]}") from None
        self.device, self.batch, self._spatial = device, batch, None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # NHWC order, as ADM flattens TensorFlow's tensor (FID does not depend on it)
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def features(self, images):
        pool, logits, spatial = [], [], []
        for start in range(0, len(images), self.batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch]))
            p, lg = self.net(x.permute(0, 3, 1, 2).to(self.device))
            pool.append(p.cpu())
            logits.append(lg.cpu())
            spatial.append(self._spatial.cpu())
        cat = lambda xs: torch.cat(xs).numpy()
        return {"pool": cat(pool), "logits": cat(logits), "spatial": cat(spatial)}
