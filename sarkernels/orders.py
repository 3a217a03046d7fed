"""Generation orders, set-size schedules, and RAR's annealing ratio.

An *order* is a permutation of the N grid cells per sample (``[B, N]``, cell = r * W + c);
a *schedule* splits the N tokens of an order into consecutive sets, one per step.
"""
import math
import re

import torch

SCHEDULES = ("ar", "constant", "cosine", "random", "randar")


def make_order(order, batch, n, generator=None, device="cpu"):
    """``"raster"``, ``"random"`` (a fresh permutation per sample, from ``generator``) or a
    permutation tensor ``[N]``/``[B, N]``; returns ``[B, N]`` int64."""
    if isinstance(order, str):
        if order == "raster":
            return torch.arange(n, device=device).expand(batch, n).clone()
        if order == "random":
            keys = torch.rand(batch, n, generator=generator, device=generator.device if generator else "cpu")
            return keys.argsort(-1).to(device)
        raise ValueError(f"order must be 'raster', 'random' or a tensor, got {order!r}")
    order = torch.as_tensor(order, device=device).long()
    order = order.expand(batch, n) if order.dim() == 1 else order
    if order.shape != (batch, n):
        raise ValueError(f"order must be [N] or [B, N] = [{batch}, {n}], got {list(order.shape)}")
    if not torch.equal(order.sort(-1).values, torch.arange(n, device=device).expand(batch, n)):
        raise ValueError(f"order must be a permutation of 0..{n - 1} in every row")
    return order


def lattice_cells(grid, scale):
    """Cell ``(scale*r, scale*c)`` of the ``scale*grid`` square grid for every cell ``(r, c)``
    of the ``grid`` square grid, in the latter's raster order: ``[grid * grid]``."""
    r = torch.arange(grid) * scale
    return (r[:, None] * (scale * grid) + r[None]).flatten()


def hierarchical_order(batch, grid, scale, generator=None):
    """Resolution extrapolation's order on the ``scale*grid`` square grid (RandAR's):
    first the :func:`lattice_cells` (rows and columns that are multiples of ``scale``),
    shuffled, then every other cell, shuffled; a fresh draw per sample: ``[B, (scale*grid)**2]``."""
    side = scale * grid
    later = torch.ones(side * side)
    later[lattice_cells(grid, scale)] = 0
    keys = torch.rand(batch, side * side, generator=generator,
                      device=generator.device if generator else "cpu")
    return (keys + later.to(keys.device)).argsort(-1).cpu()


def _steps(steps, n, name):
    if steps is None:
        raise ValueError(f"schedule {name!r} needs steps")
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}] for {n} tokens, got {steps}")
    return steps


def set_sizes(schedule, n, steps=None, generator=None):
    """Sizes of the consecutive sets (positive ints summing to n).

    - ``"ar"``: one token per step (n steps).
    - ``"constant"``: ``steps`` near-equal sets.
    - ``"cosine"``: MaskGIT's schedule: after step t, ``floor(n cos(pi/2 t/steps))`` remain.
    - ``"random"``: ``steps`` positive sizes drawn uniformly among all such splits (SAR's
      rand(N, K)).
    - ``"randar"``: the official RandAR sampler's schedule: step 1 decodes one token; step
      t >= 2 brings the decoded count to ``min(int((1 - cos(pi/2 t/steps)) n + 1), n)``
      (at least one token per step). n=16, steps=4 gives [1, 4, 5, 6]; steps=88 at n=256
      gives 88 steps, one token per step for steps 1-24. Like the official sampler,
      steps=1 still takes two steps when n > 1.
    - a list of sizes, used as given.
    """
    if n < 1:
        raise ValueError(f"need at least one token to schedule, got n={n}")
    if not isinstance(schedule, str):
        sizes = [int(s) for s in schedule]
        if any(s < 1 for s in sizes) or sum(sizes) != n:
            raise ValueError(f"explicit set sizes must be positive and sum to {n}, got {sizes}")
        return sizes
    if schedule == "ar":
        return [1] * n
    if schedule == "constant":
        k = _steps(steps, n, schedule)
        return [n // k + (i < n % k) for i in range(k)]
    if schedule == "random":
        k = _steps(steps, n, schedule)
        cuts = torch.randperm(n - 1, generator=generator)[: k - 1].sort().values + 1
        bounds = [0, *cuts.tolist(), n]
        return [b - a for a, b in zip(bounds, bounds[1:])]
    if schedule == "cosine":
        k = _steps(steps, n, schedule)
        sizes, done = [], 0
        for t in range(1, k + 1):
            target = n - math.floor(n * math.cos(math.pi / 2 * t / k))
            # at least one token now, and at least one left for each later step
            take = min(max(target - done, 1), n - done - (k - t))
            sizes.append(take)
            done += take
        return sizes
    if schedule == "randar":
        k = _steps(steps, n, schedule)
        sizes, done, t = [1], 1, 1
        while done < n:
            t += 1
            target = min(int((1 - math.cos(math.pi / 2 * t / k)) * n + 1), n)
            take = min(max(target - done, 1), n - done)
            sizes.append(take)
            done += take
        return sizes
    raise ValueError(f"schedule must be one of {SCHEDULES} or a list of sizes, got {schedule!r}")


def set_counts(spec, n=None):
    """The set counts K a SAR model trains with (one drawn uniformly per image), as a sorted
    list of distinct counts in [1, n], or None for every count 1..n. ``spec`` is None or
    ``"all"`` (1..n), a count K, an iterable of counts (a ``range`` for an inclusive range),
    or text as ``train --sar-sets`` takes it: ``"16"``, ``"8-32"`` (inclusive), ``"4,8,16"``.
    With ``n`` None only the form and the lower bound are checked."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, str):
        text, spec = spec, _parse_counts(spec)
    else:
        text = spec
        spec = [spec] if isinstance(spec, int) else list(spec)
    if not spec or not all(isinstance(k, int) and not isinstance(k, bool) for k in spec):
        raise ValueError(f"set counts must be one or more integers, got {text!r}")
    if min(spec) < 1:
        raise ValueError(f"set counts must be >= 1, got {text!r}")
    if n is not None and max(spec) > n:
        raise ValueError(f"set counts must be in [1, {n}] for {n} tokens, got {text!r}")
    return sorted(set(spec))


def _parse_counts(text):
    form = "give all, a count K, an inclusive range LO-HI or a list such as 4,8,16"
    if re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", text):
        low, high = (int(x) for x in text.split("-"))
        if low > high:
            raise ValueError(f"the range {text!r} is empty: {form}")
        return list(range(low, high + 1))
    if re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text):
        return [int(x) for x in text.split(",")]
    raise ValueError(f"cannot read {text!r} as set counts: {form}")


def set_ids(sizes, device="cpu"):
    """Set index (1-based) of each position of an order split into ``sizes``: ``[N]``."""
    return torch.repeat_interleave(torch.arange(1, len(sizes) + 1, device=device),
                                   torch.tensor(sizes, device=device))


def rar_ratio(step, start, end):
    """RAR's probability of a random order: 1 before ``start``, 0 after ``end``, linear
    in between."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return 1.0 - (step - start) / (end - start)
