"""Pure-PyTorch references of every op: the test oracle and the fallback backend.

Each function has the semantics of the op of the same name in :mod:`sarkernels.ops`
(arguments already validated there) and is differentiable through autograd.
Low-precision inputs are computed in float32; float64 stays float64.
"""
import torch

from .rope import check_positions, rotate_instruction, work_dtype


def visible(q_sets, k_sets, strict=False):
    """The set mask: ``[B, Lq, Lk]``, True where key j is visible to query i."""
    q, k = q_sets[:, :, None], k_sets[:, None, :]
    return k < q if strict else k <= q


def _finite(x):
    return torch.where(torch.isfinite(x), x, 0.0)


def set_attention(q, k, v, q_sets, k_sets, strict=False, scale=None):
    """Returns ``(out, lse)`` under :func:`sarkernels.set_attention`'s rule for empty rows
    and NaN/inf.

    lse is float32 (float64 for float64 inputs). Gradients stay finite on empty rows.
    """
    work = work_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k = k.to(work).repeat_interleave(group, 1)
    v = v.to(work).repeat_interleave(group, 1)
    # A non-finite value acts as a NaN logit for the rows that see its key. It is zeroed in
    # v itself: the other rows would meet it as weight 0 times NaN, which is NaN.
    poisoned = ~torch.isfinite(v).all(-1)[:, :, None, :]
    v = v.masked_fill(poisoned.transpose(-1, -2), 0.0)
    mask = visible(q_sets, k_sets, strict)[:, None]
    dtype, q = q.dtype, q.to(work)
    # Gradients flow through the products of the finite parts only: through q @ k^T itself
    # a NaN/inf would reach, as 0 * inf, the rows and keys whose pairs the mask hides. The
    # value stays that of the raw product (equal to the finite one where all is finite).
    dots = _finite(q) @ _finite(k).transpose(-1, -2)
    dots = dots + (q.detach() @ k.detach().transpose(-1, -2) - dots).detach()
    s = (dots * scale).masked_fill(poisoned, float("nan"))
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).detach() if s.shape[-1] else s.new_zeros(*s.shape[:-1], 1)
    m = m.masked_fill(m == float("-inf"), 0.0)  # a NaN or +inf max keeps the row NaN
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    empty = denom == 0
    # Weights exactly 0, not NaN, in the hidden pairs of a NaN row: through e @ v its NaN
    # gradient would reach the values of keys it does not see.
    p = (e / denom.masked_fill(empty, 1.0)).masked_fill(~mask, 0.0)
    out = p @ v
    lse = torch.where(empty, float("-inf"), m + torch.log(denom)).squeeze(-1)
    return out.to(dtype), lse


def check_slots(slots, cache_len):
    """Slots must lie in ``[0, cache_len)`` and be distinct within each batch row."""
    bad = (slots < 0) | (slots >= cache_len)
    if bad.any():
        b, i = bad.nonzero()[0].tolist()
        raise ValueError(f"kv_cache_append: slots[{b}, {i}] = {slots[b, i].item()} is outside "
                         f"the cache [0, {cache_len})")
    ordered = slots.sort(-1).values
    dup = ordered[:, 1:] == ordered[:, :-1]
    if dup.any():
        b, i = dup.nonzero()[0].tolist()
        raise ValueError(f"kv_cache_append: slot {ordered[b, i].item()} appears more than once "
                         f"in slots[{b}]")


def kv_cache_append(k_cache, v_cache, k, v, slots):
    """``k_cache[b, :, slots[b, i]] = k[b, :, i]`` (same for v), in place; slots int64,
    checked (:func:`check_slots`)."""
    rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
    k_cache[rows, :, slots] = k.transpose(1, 2)  # advanced indices first: [B, n, H, D]
    v_cache[rows, :, slots] = v.transpose(1, 2)


def instruction_rows(positions, instruction, num_heads=None, grid_size=None, rope_base=10000.0,
                     check=True):
    """The instruction of every token, ``[B, N, D]``: a table row, or the shared vector
    rotated by the cell's 2D RoPE (one rotation per head of ``D / num_heads``)."""
    limit = instruction.shape[0] if instruction.dim() == 2 else grid_size[0] * grid_size[1]
    if check:
        check_positions("interleave_position_instructions", positions, limit)
    if instruction.dim() == 2:
        return instruction[positions]
    return rotate_instruction(instruction, positions, num_heads, grid_size, rope_base)


def interleave_length(prefix_len, num_tokens, merge):
    """Rows of ``interleave_position_instructions``' output."""
    return prefix_len + (num_tokens if merge else 2 * num_tokens)


def interleave_position_instructions(tokens, positions, instruction, num_heads=None,
                                     grid_size=None, rope_base=10000.0, prefix=None,
                                     merge=False, check=True):
    """The row layout of ``csrc/include/sarkernels/interleave_layout.h``: prefix rows first;
    then instruction i at row ``C + 2i`` and token i at ``C + 2i + 1``, or (merge) token i at
    ``C + i`` and instruction i added to the row before it."""
    ins = instruction_rows(positions, instruction, num_heads, grid_size, rope_base, check)
    ins = ins.to(tokens.dtype)
    batch, n, dim = tokens.shape
    c = 0 if prefix is None else prefix.shape[1]
    i = torch.arange(n, device=tokens.device)
    ins_rows, tok_rows = (c + i - 1, c + i) if merge else (c + 2 * i, c + 2 * i + 1)
    out = tokens.new_zeros(batch, interleave_length(c, n, merge), dim)
    if prefix is not None:
        out = out.index_add(1, torch.arange(c, device=tokens.device), prefix)
    return out.index_add(1, tok_rows, tokens).index_add(1, ins_rows, ins)
