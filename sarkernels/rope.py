"""2D rotary position embedding in LlamaGen's convention (the one RandAR's weights use).

A head of size ``head_dim`` is rotated as ``head_dim / 2`` adjacent pairs
``(x[2j], x[2j+1])``. With ``quarter = head_dim / 4`` frequencies
``f_k = base ** (-4k / head_dim)``, pair ``j < quarter`` turns by ``row * f_j`` and pair
``j >= quarter`` by ``col * f_(j - quarter)``, where a cell index is ``row * W + col``.
The C++/CUDA kernels implement the same rule in ``csrc/include/sarkernels/rope.h``.
"""
import numbers

import torch

from .checks import flag, float_tensor, integer, integer_tensor, real

__all__ = ["rope_2d", "rope_angles", "rope_cos_sin", "rotate_instruction", "CLASS_TOKEN"]

#: Position value that marks a token for RandAR's class-token rotation (cos = sin = 0):
#: the rotated vector becomes zero, so every query gives that key a logit of 0.
CLASS_TOKEN = -1


def grid_shape(fn, grid_size):
    """``(H, W)`` from an int (a square grid) or a pair of positive ints (not bools)."""
    square = isinstance(grid_size, numbers.Number)
    grid = (grid_size, grid_size) if square else tuple(grid_size)
    if len(grid) != 2 or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool)
                                 and g >= 1 for g in grid):
        raise ValueError(f"{fn}: grid_size must be an int or (H, W) of positive ints, got "
                         f"{grid_size}")
    return grid


def check_positions(fn, positions, limit, class_token=False):
    """The one rule for cell positions ``[B, L]``: integers in ``[0, limit)`` (a table's
    rows or a grid's H * W cells), plus :data:`CLASS_TOKEN` where ``class_token``.

    Checked eagerly; skipped while torch.compile traces, where inspecting values would
    break the graph (the compiled kernels check their own positions), and on the meta
    device, which has no values.
    """
    if torch.compiler.is_compiling() or positions.device.type == "meta":
        return
    bad = (positions < 0) | (positions >= limit)
    if class_token:
        bad &= positions != CLASS_TOKEN
    if bad.any():
        b, i = bad.nonzero()[0].tolist()
        allowed = f"[0, {limit})" + (f" and is not CLASS_TOKEN ({CLASS_TOKEN})" if class_token else "")
        raise ValueError(f"{fn}: positions[{b}, {i}] = {positions[b, i].item()} is outside "
                         f"{allowed}")


def rope_angles(grid_size, head_dim, base=10000.0, *, scale=1, ntk_boundary=0, device=None):
    """The rotation angle of every (cell, pair): ``[S*H * S*W, head_dim // 2]`` float64, for
    the ``S*H x S*W`` grid (``S = scale``) in row-major cell order.

    ``scale=1`` is the trained grid: integer positions, the rule :func:`rope_2d` applies by
    default. ``scale > 1`` is resolution extrapolation's NTK-style mix (RandAR's): per
    axis, frequency index ``k < ntk_boundary`` (the highest frequencies) takes the
    extrapolated integer positions ``0 .. S*H - 1``, the others the interpolated
    positions ``linspace(0, H - 1, S*H)`` that stay inside the trained range. Pass the
    table as ``angles`` to :func:`rope_2d` and ``rope_angles`` to
    :func:`~sarkernels.interleave_position_instructions`. Built on ``device``.
    """
    fn = "rope_angles"
    grid_h, grid_w = grid_shape(fn, grid_size)
    scale = integer(fn, "scale", scale, 1)
    if integer(fn, "head_dim", head_dim, 1) % 4:
        raise ValueError(f"{fn}: head_dim must be a multiple of 4, got {head_dim}")
    base = real(fn, "base", base, above=0, finite=True)
    ntk_boundary = integer(fn, "ntk_boundary", ntk_boundary, 0)
    f64 = dict(dtype=torch.float64, device=device)
    k = torch.arange(head_dim // 4, **f64)
    freqs = base ** (-4.0 * k / head_dim)

    def axis(n):  # positions [S*n, quarter] of one axis, per frequency
        extrapolated = torch.arange(scale * n, **f64)[:, None]
        interpolated = torch.linspace(0, n - 1, scale * n, **f64)[:, None]
        return torch.where(k < ntk_boundary, extrapolated, interpolated) * freqs

    rows, cols = axis(grid_h), axis(grid_w)
    return torch.cat([rows[:, None].expand(-1, len(cols), -1),
                      cols[None].expand(len(rows), -1, -1)], -1).flatten(0, 1)


def rope_cos_sin(positions, angles, dtype=torch.float32):
    """cos and sin of every (token, pair): ``[*positions.shape, head_dim // 2]`` from the
    ``angles`` table (:func:`rope_angles`), rounded once to ``dtype``. Negative positions
    (:data:`CLASS_TOKEN`) get cos = sin = 0."""
    rows = angles.to(positions.device)[positions.to(torch.int64).clamp_min(0)]
    keep = (positions >= 0)[..., None]
    return (torch.where(keep, rows.cos(), 0.0).to(dtype),
            torch.where(keep, rows.sin(), 0.0).to(dtype))


def check_angles(fn, angles, head_dim, name="angles"):
    """An explicit angle table ``[P, head_dim // 2]`` of floats (see :func:`rope_angles`)."""
    if not isinstance(angles, torch.Tensor) or not angles.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a float tensor [P, {head_dim // 2}], got "
                        f"{getattr(angles, 'dtype', type(angles).__name__)}")
    if angles.dim() != 2 or angles.shape[1] != head_dim // 2:
        raise ValueError(f"{fn}: {name} must be [P, head_dim / 2 = {head_dim // 2}], got "
                         f"{tuple(angles.shape)}")


def rope_2d(x, positions, grid_size=None, base=10000.0, *, check=True, angles=None):
    """Rotates q or k ``x [B, H, L, D]`` by the 2D RoPE of each token's cell.

    ``positions [B, L]`` are integer row-major cells ``r * W + c`` of a ``grid_size =
    (H, W)`` grid (an int means a square grid); :data:`CLASS_TOKEN` (-1) zeroes the token
    (RandAR's class token). Any other position outside ``[0, H * W)`` raises ValueError,
    as in :func:`interleave_position_instructions` (``check=False`` skips that value check,
    a host sync on CUDA, for callers whose cells are valid by construction). D must be a
    multiple of 4. Computed in float32 (float64 for float64 input) and returned in ``x``'s
    dtype. Differentiable in ``x``.

    ``angles`` (instead of ``grid_size``): an explicit table ``[P, D / 2]`` of rotation
    angles per position (:func:`rope_angles`, e.g. the fractional positions of resolution
    extrapolation); ``positions`` then index its rows and must lie in ``[0, P)`` (or be
    :data:`CLASS_TOKEN`).
    """
    if (grid_size is None) == (angles is None):
        raise ValueError("rope_2d: pass exactly one of grid_size and angles")
    float_tensor("rope_2d", "x", x)
    real("rope_2d", "base", base, above=0, finite=True)
    flag("rope_2d", "check", check)
    if x.dim() != 4:
        raise ValueError(f"rope_2d: x must be [B, H, L, D], got shape {tuple(x.shape)}")
    positions = integer_tensor("rope_2d", "positions", positions)
    if positions.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"rope_2d: positions must be [B, L] = [{x.shape[0]}, {x.shape[2]}], "
                         f"got {tuple(positions.shape)}")
    if x.shape[-1] % 4:
        raise ValueError(f"rope_2d: head dim must be a multiple of 4, got {x.shape[-1]}")
    if angles is None:
        angles = rope_angles(grid_shape("rope_2d", grid_size), x.shape[-1], base,
                             device=positions.device)
    else:
        check_angles("rope_2d", angles, x.shape[-1])
    if check:
        check_positions("rope_2d", positions, angles.shape[0], class_token=True)
    cos, sin = rope_cos_sin(positions, angles, work_dtype(x.dtype))
    return rotate(x, cos[:, None], sin[:, None])


def work_dtype(dtype):
    """The dtype the ops compute in for inputs of ``dtype``: float64 stays, 16-bit
    floats and float32 compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate(x, cos, sin):
    """``x [B, H, L, D]`` with each pair ``(x[2i], x[2i+1])`` rotated by ``cos``/``sin``
    (``[B, 1, L, D / 2]``, from :func:`rope_cos_sin`), computed in their dtype and returned
    in ``x``'s: the rotation :func:`rope_2d` applies, for callers that reuse one table."""
    x0, x1 = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2).to(x.dtype)


def rotate_instruction(instruction, positions, num_heads, grid_size=None, base=10000.0, *,
                       angles=None):
    """RandAR's position instructions ``[B, L, D]``: the shared vector ``instruction [D]``
    split into ``num_heads`` heads, each rotated by the 2D RoPE of ``positions [B, L]``
    (``grid_size`` or an ``angles`` table, as in :func:`rope_2d`; positions unchecked)."""
    batch, n = positions.shape
    heads = instruction.view(1, num_heads, 1, -1).expand(batch, -1, n, -1)
    return rope_2d(heads, positions, grid_size, base, check=False,
                   angles=angles).transpose(1, 2).flatten(2)
