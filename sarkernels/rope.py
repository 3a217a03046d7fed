"""2D rotary position embedding in LlamaGen's convention (the one RandAR's weights use).

A head of size ``head_dim`` is rotated as ``head_dim / 2`` adjacent pairs
``(x[2j], x[2j+1])``. With ``quarter = head_dim / 4`` frequencies
``f_k = base ** (-4k / head_dim)``, pair ``j < quarter`` turns by ``row * f_j`` and pair
``j >= quarter`` by ``col * f_(j - quarter)``, where a cell index is ``row * W + col``.
The C++/CUDA kernels implement the same rule in ``csrc/include/sarkernels/rope.h``.
"""
import numbers

import torch

__all__ = ["rope_2d", "rope_cos_sin", "CLASS_TOKEN"]

#: Position value that marks a token for RandAR's class-token rotation (cos = sin = 0):
#: the rotated vector becomes zero, so every query gives that key a logit of 0.
CLASS_TOKEN = -1


def grid_shape(fn, grid_size):
    """``(H, W)`` from an int (a square grid) or a pair of positive ints."""
    square = isinstance(grid_size, numbers.Number)
    grid = (grid_size, grid_size) if square else tuple(grid_size)
    if len(grid) != 2 or not all(isinstance(g, numbers.Integral) and g >= 1 for g in grid):
        raise ValueError(f"{fn}: grid_size must be an int or (H, W) of positive ints, got "
                         f"{grid_size}")
    return grid


def check_positions(fn, positions, limit, class_token=False):
    """The one rule for cell positions ``[B, L]``: integers in ``[0, limit)`` (a table's
    rows or a grid's H * W cells), plus :data:`CLASS_TOKEN` where ``class_token``.

    Checked eagerly; skipped while torch.compile traces, where inspecting values would
    break the graph (the compiled kernels check their own positions).
    """
    if torch.compiler.is_compiling():
        return
    bad = (positions < 0) | (positions >= limit)
    if class_token:
        bad &= positions != CLASS_TOKEN
    if bad.any():
        b, i = bad.nonzero()[0].tolist()
        allowed = f"[0, {limit})" + (f" and is not CLASS_TOKEN ({CLASS_TOKEN})" if class_token else "")
        raise ValueError(f"{fn}: positions[{b}, {i}] = {positions[b, i].item()} is outside "
                         f"{allowed}")


def rope_cos_sin(positions, grid_w, head_dim, base=10000.0, dtype=torch.float32):
    """cos and sin of every (token, pair): ``[*positions.shape, head_dim // 2]``.

    Angles are computed in float64 and rounded once to ``dtype``. Negative positions
    (:data:`CLASS_TOKEN`) get cos = sin = 0.
    """
    quarter = head_dim // 4
    k = torch.arange(quarter, device=positions.device, dtype=torch.float64)
    freqs = base ** (-4.0 * k / head_dim)
    cell = positions.to(torch.int64).clamp_min(0)
    coords = torch.stack([cell // grid_w, cell % grid_w], -1).to(torch.float64)
    angles = (coords[..., :, None] * freqs).flatten(-2)  # row angles, then column angles
    keep = (positions >= 0)[..., None]
    cos = torch.where(keep, angles.cos(), 0.0).to(dtype)
    sin = torch.where(keep, angles.sin(), 0.0).to(dtype)
    return cos, sin


def rope_2d(x, positions, grid_size, base=10000.0, *, check=True):
    """Rotates q or k ``x [B, H, L, D]`` by the 2D RoPE of each token's cell.

    ``positions [B, L]`` are integer row-major cells ``r * W + c`` of a ``grid_size =
    (H, W)`` grid (an int means a square grid); :data:`CLASS_TOKEN` (-1) zeroes the token
    (RandAR's class token). Any other position outside ``[0, H * W)`` raises ValueError,
    as in :func:`interleave_position_instructions` (``check=False`` skips that value check,
    a host sync on CUDA, for callers whose cells are valid by construction). D must be a
    multiple of 4. Computed in
    float32 (float64 for float64 input) and returned in ``x``'s dtype. Differentiable in
    ``x``.
    """
    grid_h, grid_w = grid_shape("rope_2d", grid_size)
    if x.dim() != 4:
        raise ValueError(f"rope_2d: x must be [B, H, L, D], got shape {tuple(x.shape)}")
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or \
            positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"rope_2d: positions must be an integer tensor, got "
                        f"{getattr(positions, 'dtype', type(positions).__name__)}")
    if positions.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"rope_2d: positions must be [B, L] = [{x.shape[0]}, {x.shape[2]}], "
                         f"got {tuple(positions.shape)}")
    if x.shape[-1] % 4:
        raise ValueError(f"rope_2d: head dim must be a multiple of 4, got {x.shape[-1]}")
    if check:
        check_positions("rope_2d", positions, grid_h * grid_w, class_token=True)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(positions, grid_w, x.shape[-1], base, work)
    cos, sin = cos[:, None], sin[:, None]
    x0, x1 = x.to(work).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2).to(x.dtype)
