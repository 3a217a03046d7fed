"""Which attention masks are set masks, and their set ids (:func:`sets_from_mask`).

A mask is a set mask iff the keys visible to any two of its rows are nested (one row sees
every key the other sees). Proof sketch, for one batch row with visible-key sets ``V_i``:

- only if: with ids, ``V_i = {j : k_sets[j] <= q_sets[i]}``, so ``q_sets[i] <= q_sets[r]``
  gives ``V_i ⊆ V_r``;
- if: let ``c_j`` be the number of rows that see key j. The rows that see a key form an
  up-set of the chain of ``V_i``, so these row sets are nested too, and ``c_j' >= c_j``
  means every row that sees j sees j'. Each ``V_i`` is therefore the keys with
  ``c_j >= m_i``, its least count, and ``k_sets[j] = L - c_j``, ``q_sets[i] = L - m_i``
  reproduce the mask (a row that sees nothing gets ``-1``, below every key's id).

Ordering keys by how many rows see them thus puts every row's keys first: in that order a
set mask is a staircase, and a row sees exactly its ``|V_i|`` most-seen keys. Causal masks
get ``arange`` ids, key padding ``0`` for kept keys and ``L`` for dropped ones.
"""
import torch

from .. import reference

__all__ = ["sets_from_mask", "NotASetMask"]


class NotASetMask(ValueError):
    """A mask that no pair of set ids expresses; ``str()`` names the first offending row."""


def sets_from_mask(mask):
    """Set ids ``(q_sets, k_sets)`` such that key j is visible to query i (``k_sets[j] <=
    q_sets[i]``, as in :func:`sarkernels.set_attention` with ``strict=False``) exactly where
    ``mask`` allows it.

    ``mask``: bool (True = attend, as in SDPA) or float with values 0 (attend) and ``-inf``
    (do not), shaped ``[L, S]`` (ids ``[L]``, ``[S]``), ``[B, L, S]`` or ``[B, H, L, S]``
    (ids ``[B, L]``, ``[B, S]``). Set ids belong to a batch row and serve all its heads, so
    a 4-D mask must be the same for every head. A mask is a set mask iff in every batch row
    the keys visible to any two rows are nested (see the module docstring for why): causal,
    block-causal, prefix-LM and key-padding masks are; a sliding window, a diagonal kept on
    padded rows, or a bias is not. Empty rows are allowed (id ``-1``).

    Raises :class:`NotASetMask` (a ValueError) naming the first row (in row order) whose
    keys are not nested with those of an earlier row, with a key each sees and the other
    does not; TypeError/ValueError for a mask of the wrong dtype, shape or values. Cost:
    O(B L S) time and bool memory, O(B L S log L) to find the row of a refused mask.
    """
    return _ids(_visible(mask), mask.dim() != 2, "mask")


def _visible(mask, fn="sets_from_mask"):
    """``[B, L, S]`` bool: True where the mask lets a row see a key."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: mask must be a tensor, got {type(mask).__name__}")
    if mask.dim() not in (2, 3, 4):
        raise ValueError(f"{fn}: mask must be [L, S], [B, L, S] or [B, H, L, S], got shape "
                         f"{list(mask.shape)}")
    if mask.dtype == torch.bool:
        visible = mask
    elif mask.dtype.is_floating_point:
        visible = mask == 0
        other = ~(visible | (mask == float("-inf")))
        if other.any():
            at = other.nonzero()[0].tolist()
            raise NotASetMask(f"{fn}: a float mask must hold only 0 (attend) and -inf (do not), "
                              f"got {mask[tuple(at)].item()} at {at}: a bias has no set ids")
    else:
        raise TypeError(f"{fn}: mask must be bool or floating point, got {mask.dtype}")
    if visible.dim() == 4:
        per_head = (visible != visible[:, :1]).flatten(2).any(-1)
        if per_head.any():
            b, h = per_head.nonzero()[0].tolist()
            raise NotASetMask(f"{fn}: mask[{b}, {h}] differs from mask[{b}, 0]: set ids belong "
                              f"to a batch row and serve all its heads, so a per-head mask has "
                              f"none")
        visible = visible[:, 0]
    return visible if visible.dim() == 3 else visible[None]


def _ids(visible, batched, name):
    """The ids of a ``[B, L, S]`` visibility (squeezed to ``[L]``/``[S]`` unless
    ``batched``), or NotASetMask naming the mask ``name``."""
    rows = visible.shape[1]
    seen_by = visible.sum(1)  # [B, S]
    k_sets = rows - seen_by
    sizes = visible.sum(2)  # [B, L]
    # in a set mask a row sees its |V_i| most-seen keys: its id is that last key's
    ranked = k_sets.sort(-1).values
    last = ranked.gather(1, (sizes - 1).clamp_min(0)) if ranked.shape[1] else sizes
    q_sets = torch.where(sizes > 0, last, -1)
    wrong = reference.visible(q_sets, k_sets) != visible
    if wrong.any():
        b = int(wrong.flatten(1).any(1).nonzero()[0])
        raise NotASetMask(_refusal(visible[b], f"{name}[{b}]" if batched else name))
    return (q_sets, k_sets) if batched else (q_sets[0], k_sets[0])


def _is_chain(visible):
    """Whether the rows of ``[n, S]`` have nested visible keys: sorted by size, each row's
    keys lie within the next row's."""
    ordered = visible[visible.sum(1).argsort(stable=True)]
    return not (ordered[:-1] & ~ordered[1:]).any()


def _refusal(visible, where):
    """The message for a ``[L, S]`` visibility that is not a chain: the first row that is
    not nested with an earlier one (rows ``0..i`` being a chain is monotone in ``i``)."""
    lo, hi = 1, visible.shape[0] - 1  # rows 0..lo-1 form a chain, rows 0..hi do not
    while lo < hi:
        mid = (lo + hi) // 2
        if _is_chain(visible[:mid + 1]):
            lo = mid + 1
        else:
            hi = mid
    row, earlier = visible[hi], visible[:hi]
    only_row, only_earlier = row & ~earlier, earlier & ~row
    other = int((only_row.any(1) & only_earlier.any(1)).nonzero()[0])
    key, other_key = int(only_row[other].nonzero()[0]), int(only_earlier[other].nonzero()[0])
    return (f"{where} is not a set mask: row {hi} sees key {key} but not key {other_key}, "
            f"which row {other} sees without key {key} (set ids need the keys visible to any "
            f"two rows to be nested)")
