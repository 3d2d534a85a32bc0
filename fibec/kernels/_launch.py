"""Launch planning on the host, in plain Python: integer arithmetic, and whether Triton interprets.

triton.cdiv and triton.next_power_of_2 go through Triton's constexpr machinery at several
microseconds a call; a LoRA layer's launch plan made about twenty such calls, a third of the
launchers' own Python time under cProfile. (On an H200 the op's host time, 0.45 ms a call, is
mostly Triton's launches, so this shows little there: bench/RESULTS.md.)
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
