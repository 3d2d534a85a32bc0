"""Integer arithmetic of launch planning on the host, in plain Python.

triton.cdiv and triton.next_power_of_2 go through Triton's constexpr machinery at several
microseconds a call; a LoRA layer's launch plan makes about twenty such calls, which on a GPU
added up to a measurable share of a small op's host time.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
