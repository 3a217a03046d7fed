"""The metrics of the ADM evaluation suite (guided-diffusion's ``evaluations/evaluator.py``,
which RandAR, RAR and LlamaGen report) on feature arrays: the Frechet distance of two
Gaussians, the Inception Score, and k-NN manifold precision and recall (k = 3)."""
import numpy as np
import torch


def statistics(features):
    """``(mu, sigma)`` of ``features [N, D]`` in float64, as ADM's ``np.mean``/``np.cov``."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet(mu1, sigma1, mu2, sigma2):
    """``|mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2))``.

    ``tr (s1 s2)^(1/2)`` is the sum of the square roots of the eigenvalues of
    ``s1^(1/2) s2 s1^(1/2)``, a symmetric matrix with the eigenvalues of ``s1 s2``: two
    symmetric eigendecompositions instead of ADM's ``scipy.linalg.sqrtm``, which took 49 s
    for 2048 features on two CPU cores (these 0.8 s) and, for the rank-deficient
    covariances of a few samples, returns imaginary parts ADM then rejects.
    """
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(w.clip(0))) @ v.T
    return _distance(mu1, mu2, np.trace(sigma1), np.trace(sigma2), root @ sigma2 @ root)


def frechet_to(features, mu2, sigma2):
    """``frechet(*statistics(features), mu2, sigma2)``, with no D x D decomposition for
    fewer samples than dimensions: ``s1 = A^T A`` for the centred rows ``A / sqrt(N - 1)``,
    and ``s1 s2`` has the nonzero eigenvalues of the N x N matrix ``A s2 A^T``."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) > x.shape[1]:
        return frechet(*statistics(x), mu2, sigma2)
    mu1 = x.mean(0)
    a = (x - mu1) / np.sqrt(len(x) - 1)
    return _distance(mu1, mu2, (a * a).sum(), np.trace(sigma2), a @ sigma2 @ a.T)


def _distance(mu1, mu2, trace1, trace2, middle):
    """The Frechet distance from the means, the traces and a symmetric matrix whose
    eigenvalues are those of ``s1 s2``."""
    trace_root = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(0)).sum()
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + trace1 + trace2 - 2 * trace_root)


def inception_score(logits, split_size=5000):
    """ADM's: ``exp(E_x KL(p(y|x) || p(y)))`` over consecutive splits of ``split_size``
    samples (p(y) the split's mean), averaged over the splits."""
    log_p = torch.as_tensor(np.asarray(logits), dtype=torch.float64).log_softmax(-1)
    scores = []
    for part in log_p.split(split_size):
        p = part.exp()
        log_mean = p.mean(0).log()
        scores.append((p * (part - log_mean)).sum(1).mean().exp().item())
    return float(np.mean(scores))


def _squared_distances(a, b):
    """ADM's ``|a|^2 - 2 a.b + |b|^2``, clamped at 0."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp_min(0)


def manifold_radii(features, k=3, batch=10000):
    """Each point's squared distance to its k-th nearest other point (ADM's
    ``ManifoldEstimator``, ``nhood_sizes=[k]``: the point itself is the 0th)."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if len(f) <= k:
        raise ValueError(f"precision and recall need more than k={k} images per set, "
                         f"got {len(f)}")
    return torch.cat([_squared_distances(f[i:i + batch], f).kthvalue(k + 1, 1).values
                      for i in range(0, len(f), batch)])


def precision_recall(ref, samples, k=3, batch=10000):
    """``(precision, recall)``: the fraction of samples inside the reference manifold (the
    union of balls around each reference point, of its k-NN radius) and of reference
    points inside the samples' manifold."""
    ref_radii, sample_radii = manifold_radii(ref, k, batch), manifold_radii(samples, k, batch)
    r = torch.as_tensor(np.asarray(ref), dtype=torch.float32)
    s = torch.as_tensor(np.asarray(samples), dtype=torch.float32)
    sample_in = torch.zeros(len(s), dtype=torch.bool)
    ref_in = torch.zeros(len(r), dtype=torch.bool)
    for i in range(0, len(r), batch):
        for j in range(0, len(s), batch):
            d = _squared_distances(r[i:i + batch], s[j:j + batch])
            sample_in[j:j + batch] |= (d <= ref_radii[i:i + batch, None]).any(0)
            ref_in[i:i + batch] |= (d <= sample_radii[None, j:j + batch]).any(1)
    return sample_in.double().mean().item(), ref_in.double().mean().item()
