"""Argument checks shared by the public ops: each error names the argument."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .config import bounds_text, within_bounds

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Raise TypeError/ValueError naming `name` unless `value` is a fitting tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {value.dtype}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return value


def check_shape(name: str, value: torch.Tensor, shape: Sequence[int]) -> None:
    """Raise ValueError naming `name` unless `value.shape == shape`."""
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first tensor on a different device than the first one given."""
    given = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = given[0]
    for name, t in given[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float within [low, high] (an end open when low_open / high_open); TypeError
    or ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if not within_bounds(value, low, high, low_open, high_open):
        raise ValueError(f"{name} must be {bounds_text(low, high, low_open, high_open)}, got {value}")
    return value


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int (numpy integers too, bool not) within [low, high]; TypeError or ValueError
    naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if not within_bounds(value, low, high):
        raise ValueError(f"{name} must be {bounds_text(low, high)}, got {value}")
    return value


def fraction_count(fraction: float, n: int) -> int:
    """How many of n items a fraction keeps: ceil(fraction * n), at least 1 and at most n.

    The one rounding rule of every such count (clients a round, curriculum pools and steps, GAL
    size, neurons, upload entries): the product is rounded to 6 places first, so that float noise
    (0.28 * 25 = 7.000000000000001) never adds an item."""
    return min(n, max(1, math.ceil(round(fraction * n, 6))))
