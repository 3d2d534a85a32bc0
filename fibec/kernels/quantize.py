"""The payload's blockwise int8 and int4 values, computed where the tensor lives (docs/PAYLOAD.md,
"Values body").

A CUDA tensor's values are quantised on the GPU, so that only the body (about a quarter of the
fp32 bytes for int8, an eighth for int4) crosses to the host. Blocks of 64 consecutive values,
with L = 127 (int8) or 7 (int4) steps each side of zero: scale = max|x| / L and
q = round_half_even(x * lift * (L / (max|x| * lift))) clamped to [-L, L], in fp32, with
lift = 2^64 when max|x| < 2^-100 (else 1); a block holding inf or NaN gets a NaN scale and zeros,
a block of zeros scale 0. int4 packs two steps a byte, value 2k in the low nibble of byte k (two's
complement), a last odd value leaving the high nibble 0. Bit for bit what the C++ encoder
(csrc/quant_blocks.cpp) writes: the product is rounded before the rounding constant is added (no
fused multiply-add), as there. Imports nothing from fibec.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cache import CachedLaunch
from ._launch import cdiv

BLOCK = 64  # values per scale (the payload format's)
BLOCKS_PER_PROGRAM = 16
FORMATS = ("int8", "int4")


@triton.jit
def _block_magnitude(x):
    """Per row of x [BLOCKS, k]: (max|x| over its ordered entries, whether it holds a NaN)."""
    amax = tl.max(tl.where(x != x, 0.0, tl.abs(x)), axis=1)
    return amax, tl.max((x != x).to(tl.int32), axis=1) != 0


@triton.jit
def _block_scale(amax, unordered, LEVELS: tl.constexpr):
    """Per block: (its scale, lift, L / (max|x| * lift), whether its values are quantised)."""
    usable = (~unordered) & (amax < float("inf"))
    # Correctly rounded divisions, as in C++ (a plain / compiles to an approximate one on a GPU).
    scale = tl.where(usable, tl.div_rn(amax, LEVELS), float("nan"))
    lift = tl.where(amax < 7.888609052210118e-31, 1.8446744073709552e19, 1.0)  # 2^-100, 2^64
    lifted = tl.where(amax > 0.0, amax * lift, 1.0)
    inverse = tl.div_rn(tl.full(lifted.shape, LEVELS, tl.float32), lifted)
    return scale, lift, inverse, usable & (amax > 0.0)


@triton.jit
def _steps(x, lift, inverse, quantised, LEVELS: tl.constexpr):
    """x [BLOCKS, k] as whole fp32 steps of its block's scale (0 where the block is not quantised)."""
    r = (x * lift[:, None]) * inverse[:, None]
    r = tl.minimum(tl.maximum(r, -LEVELS), LEVELS)
    # Adding and subtracting 1.5 * 2^23 rounds |r| <= 2^22 to nearest even.
    r = (r + 12582912.0) - 12582912.0
    return tl.where(quantised[:, None], r, 0.0)


@triton.jit
def _int8_blocks_kernel(X, SCALES, Q, n, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCKS consecutive blocks of X (any float dtype, read as fp32) -> their scales and int8 values."""
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offsets = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    inside = offsets < n
    x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
    amax, unordered = _block_magnitude(x)
    scale, lift, inverse, quantised = _block_scale(amax, unordered, 127.0)
    tl.store(SCALES + rows, scale, mask=rows * BLOCK < n)
    tl.store(Q + offsets, _steps(x, lift, inverse, quantised, 127.0).to(tl.int8), mask=inside)


@triton.jit
def _int4_blocks_kernel(X, SCALES, Q, n, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """The same at 7 steps, two a byte: each byte's even value and odd value are loaded apart."""
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    evens = rows[:, None] * BLOCK + 2 * tl.arange(0, BLOCK // 2)[None, :]
    # Past n the odd value reads 0, which steps to 0: the last odd value's high nibble stays 0.
    even = tl.load(X + evens, mask=evens < n, other=0.0).to(tl.float32)
    odd = tl.load(X + evens + 1, mask=evens + 1 < n, other=0.0).to(tl.float32)
    even_max, even_unordered = _block_magnitude(even)
    odd_max, odd_unordered = _block_magnitude(odd)
    scale, lift, inverse, quantised = _block_scale(tl.maximum(even_max, odd_max), even_unordered | odd_unordered,
                                                   7.0)
    low = _steps(even, lift, inverse, quantised, 7.0).to(tl.int32) & 0xF
    high = _steps(odd, lift, inverse, quantised, 7.0).to(tl.int32) & 0xF
    tl.store(SCALES + rows, scale, mask=rows * BLOCK < n)
    tl.store(Q + evens // 2, (low | (high << 4)).to(tl.uint8), mask=evens < n)


_LAUNCHERS = {"int8": CachedLaunch(_int8_blocks_kernel), "int4": CachedLaunch(_int4_blocks_kernel)}


def value_bytes(values: str, n: int) -> int:
    """Bytes of n values after the scales: n for int8, ceil(n / 2) for int4."""
    return n if values == "int8" else -(-n // 2)


def quantise_blocks(x: torch.Tensor, values: str, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales [ceil(n/64)] fp32, q) of a contiguous 1-D float tensor x [n], n >= 1, in `values`
    ("int8": q [n] int8; "int4": q [ceil(n/2)] uint8, two steps a byte); written into `out` =
    (scales, q) when given (contiguous, those shapes and dtypes, x's device)."""
    if values not in FORMATS:
        raise ValueError(f"values must be one of {FORMATS}, got {values!r}")
    n = x.numel()
    blocks = cdiv(n, BLOCK)
    if out is None:
        out = (torch.empty(blocks, dtype=torch.float32, device=x.device),
               torch.empty(value_bytes(values, n), dtype=torch.int8 if values == "int8" else torch.uint8,
                           device=x.device))
    scales, q = out
    # No fused multiply-add: it would round x * lift * inverse + 1.5 * 2^23 once, not twice as C++ does.
    _LAUNCHERS[values][(cdiv(blocks, BLOCKS_PER_PROGRAM),)](x, scales, q, n, BLOCKS=BLOCKS_PER_PROGRAM, BLOCK=BLOCK,
                                                            enable_fp_fusion=False)
    return scales, q
