"""The payload's int8 blockwise values, computed where the tensor lives (docs/PAYLOAD.md, "Values body").

A CUDA tensor's values are quantised on the GPU, so that only the int8 body (about a quarter of
the fp32 bytes) crosses to the host. Blocks of 64 consecutive values: scale = max|x| / 127 and
q = round_half_even(x * lift * (127 / (max|x| * lift))) clamped to [-127, 127], in fp32, with
lift = 2^64 when max|x| < 2^-100 (else 1); a block holding inf or NaN gets a NaN scale and zeros,
a block of zeros scale 0. Bit for bit what the C++ encoder (csrc/quant_blocks.cpp) writes: the
product is rounded before the rounding constant is added (no fused multiply-add), as there.
Imports nothing from fibec.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cache import CachedLaunch
from ._launch import cdiv

BLOCK = 64  # values per scale (the payload format's)
BLOCKS_PER_PROGRAM = 16


@triton.jit
def _int8_blocks_kernel(X, SCALES, Q, n, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCKS consecutive blocks of X (any float dtype, read as fp32) -> their scales and int8 values."""
    rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    offsets = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    inside = offsets < n
    x = tl.load(X + offsets, mask=inside, other=0.0).to(tl.float32)
    magnitude = tl.abs(x)
    unordered = tl.max((x != x).to(tl.int32), axis=1) != 0
    amax = tl.max(tl.where(x != x, 0.0, magnitude), axis=1)
    usable = (~unordered) & (amax < float("inf"))
    # Correctly rounded divisions, as in C++ (a plain / compiles to an approximate one on a GPU).
    scale = tl.where(usable, tl.div_rn(amax, 127.0), float("nan"))
    lift = tl.where(amax < 7.888609052210118e-31, 1.8446744073709552e19, 1.0)  # 2^-100, 2^64
    lifted = tl.where(amax > 0.0, amax * lift, 1.0)
    inverse = tl.div_rn(tl.full(lifted.shape, 127.0, tl.float32), lifted)
    r = (x * lift[:, None]) * inverse[:, None]
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    # Adding and subtracting 1.5 * 2^23 rounds |r| <= 2^22 to nearest even.
    r = (r + 12582912.0) - 12582912.0
    q = tl.where((usable & (amax > 0.0))[:, None], r, 0.0).to(tl.int8)
    tl.store(SCALES + rows, scale, mask=rows * BLOCK < n)
    tl.store(Q + offsets, q, mask=inside)


_int8_blocks = CachedLaunch(_int8_blocks_kernel)


def int8_blocks(x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales [ceil(n/64)] fp32, q [n] int8) of a contiguous 1-D float tensor x [n], n >= 1;
    written into `out` = (scales, q) when given (contiguous, those shapes and dtypes, x's device)."""
    n = x.numel()
    blocks = cdiv(n, BLOCK)
    if out is None:
        out = (torch.empty(blocks, dtype=torch.float32, device=x.device),
               torch.empty(n, dtype=torch.int8, device=x.device))
    scales, q = out
    # No fused multiply-add: it would round x * lift * inverse + 1.5 * 2^23 once, not twice as C++ does.
    _int8_blocks[(cdiv(blocks, BLOCKS_PER_PROGRAM),)](x, scales, q, n, BLOCKS=BLOCKS_PER_PROGRAM, BLOCK=BLOCK,
                                                      enable_fp_fusion=False)
    return scales, q
