"""The argument checks the ops, the modules and the models share: one rule per kind of
argument, and every error names the function (``fn``; None where the argument's name says
enough), the argument, what it must be and what it got.
"""
import math
import numbers

import torch

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _got(x):
    return f"{type(x).__name__} {x!r}"


def _arg(fn, name):
    return f"{fn}: {name}" if fn else name


def float_tensor(fn, name, t, dtype=None):
    """``t`` must be a float32/float64/float16/bfloat16 tensor (of ``dtype`` if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_arg(fn, name)} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{_arg(fn, name)} must be float32/float64/float16/bfloat16, got "
                        f"{t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{_arg(fn, name)} must have dtype {dtype} (like the first input), "
                        f"got {t.dtype}")


def integer_tensor(fn, name, t):
    """``t`` (set ids, slots, positions: an integer tensor of any dtype but uint64) as
    int64, the one dtype every backend indexes and compares in. uint64 is refused: its
    values from 2^63 have no int64 equal, and PyTorch's CPU ops cannot compare them."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_arg(fn, name)} must be a tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{_arg(fn, name)} must be an integer tensor, got {t.dtype}")
    if t.dtype == torch.uint64:
        raise TypeError(f"{_arg(fn, name)} must be an integer tensor of a dtype other than "
                        f"uint64 (values from 2^63 have no int64 equal), got {t.dtype}")
    return t.to(torch.int64)


def flag(fn, name, x):
    """``x`` must be a bool: a truthy string or number ('no', 0.5) is more likely a mistake
    than a choice."""
    if not isinstance(x, bool):
        raise TypeError(f"{_arg(fn, name)} must be a bool (True or False), got {_got(x)}")


def integer(fn, name, x, low=None):
    """``x`` (an int, not a bool) as an int, at least ``low`` if given."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{_arg(fn, name)} must be an int, got {_got(x)}")
    if low is not None and x < low:
        raise ValueError(f"{_arg(fn, name)} must be an int >= {low}, got {x!r}")
    return int(x)


def real(fn, name, x, low=None, *, above=None, finite=False):
    """``x`` (a real number: not a bool, a string or a complex) as a float; where given,
    ``>= low``, ``> above`` and finite."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{_arg(fn, name)} must be a real number, got {_got(x)}")
    x = float(x)
    rules = [f">= {low}"] * (low is not None) + [f"> {above}"] * (above is not None) + \
        ["finite"] * finite
    # NaN fails every comparison, so it breaks any bound given
    ok = (low is None or x >= low) and (above is None or x > above) and \
        (not finite or math.isfinite(x))
    if not ok:
        raise ValueError(f"{_arg(fn, name)} must be {' and '.join(rules)}, got {x!r}")
    return x
