"""Masked SGD / AdamW steps in one pass over memory.

p is seen as a [n_rows, n_cols] matrix: an element mask or no mask uses one row of all p's
entries; a neuron mask over rows (mask_dim 0) or columns (mask_dim 1) uses p's own 2-D shape
and is broadcast inside the kernel, so no full mask is ever built. Each program loads the mask
first, and a tile with none set stops there (neuron masks leave most tiles empty). Row masks and
no mask move whole rows: the mask is the load/store mask of p, grad and the state. Element and
column masks at low density select a few entries of most 32-byte memory sectors, and a sector
written in part costs a read-modify-write in the memory system; so they read and write p and the
state in whole groups of 8 entries (a sector of fp32 state) wherever a group holds a selected
entry, storing the loaded bits back unchanged where the mask is unset, and skip the other groups.
Either way the entries the mask leaves unset keep their bits. State is fp32; bf16/fp16 p is
updated in fp32 and rounded. Imports nothing from fibec.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cache import CachedLaunch
from ._launch import cdiv, interpreting, next_power_of_2

_NO_MASK, _ELEMENT, _ROWS, _COLS = 0, 1, 2, 3
# Entries per program on a GPU (4 warps: 16 a thread; 4096 with 8 warps ran the 10% row mask at
# 27% of copy_ bandwidth on an H200, against 60% for 2048). The interpreter runs each program as
# numpy calls, so there few large tiles are much faster.
TILE, INTERPRETER_TILE = 2048, 1 << 16
SECTOR_ENTRIES = 8  # fp32 state entries in a 32-byte memory sector


@triton.jit
def _selected_offsets(mask_ptr, n_rows, n_cols, n_col_blocks,
                      MASK_KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """(flat offsets, which of them to update, which to read and write back, whether any is) for
    this program's [BLOCK_R, BLOCK_C] tile; the entries to write back are the selected ones widened
    to whole groups of GROUP along a row for element and column masks."""
    pid = tl.program_id(0)
    # int64 so that offsets past 2**31 entries (one-row view of a huge p) do not wrap.
    rows = (pid // n_col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_rows = rows < n_rows
    in_cols = cols < n_cols
    offsets = rows[:, None] * n_cols + cols[None, :]
    selected = in_rows[:, None] & in_cols[None, :]
    any_selected = True  # no mask: every tile of the grid holds entries to update
    if MASK_KIND == 1:
        selected = tl.load(mask_ptr + offsets, mask=selected, other=0) != 0
        any_selected = tl.max(selected.to(tl.int32)) != 0
    elif MASK_KIND == 2:
        row_set = tl.load(mask_ptr + rows, mask=in_rows, other=0) != 0
        selected = selected & row_set[:, None]
        any_selected = tl.max(row_set.to(tl.int32)) != 0
    elif MASK_KIND == 3:
        col_set = tl.load(mask_ptr + cols, mask=in_cols, other=0) != 0
        selected = selected & col_set[None, :]
        any_selected = tl.max(col_set.to(tl.int32)) != 0
    touched = selected
    if MASK_KIND == 1 or MASK_KIND == 3:
        groups = tl.reshape(selected.to(tl.int32), (BLOCK_R, BLOCK_C // GROUP, GROUP))
        in_group = tl.broadcast_to(tl.max(groups, axis=2)[:, :, None], (BLOCK_R, BLOCK_C // GROUP, GROUP))
        touched = (tl.reshape(in_group, (BLOCK_R, BLOCK_C)) != 0) & in_rows[:, None] & in_cols[None, :]
    return offsets, selected, touched, any_selected


@triton.jit
def _masked_adamw_kernel(p_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, mask_ptr,
                         n_rows, n_cols, n_col_blocks,
                         decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size,
                         MASK_KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                         GROUP: tl.constexpr):
    offsets, selected, touched, any_selected = _selected_offsets(mask_ptr, n_rows, n_cols, n_col_blocks,
                                                                 MASK_KIND, BLOCK_R, BLOCK_C, GROUP)
    # A tile the mask leaves empty skips its loads and arithmetic: with neuron masks most do.
    if any_selected:
        p_before = tl.load(p_ptr + offsets, mask=touched, other=0.0)
        grad = tl.load(grad_ptr + offsets, mask=selected, other=0.0).to(tl.float32)
        exp_avg_before = tl.load(exp_avg_ptr + offsets, mask=touched, other=0.0)
        exp_avg_sq_before = tl.load(exp_avg_sq_ptr + offsets, mask=touched, other=0.0)
        p = p_before.to(tl.float32) * decay
        exp_avg = exp_avg_before + one_minus_beta1 * (grad - exp_avg_before)
        exp_avg_sq = exp_avg_sq_before * beta2 + one_minus_beta2 * grad * grad
        denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
        p = p + neg_step_size * tl.div_rn(exp_avg, denom)
        tl.store(p_ptr + offsets, tl.where(selected, p.to(p_ptr.dtype.element_ty), p_before), mask=touched)
        tl.store(exp_avg_ptr + offsets, tl.where(selected, exp_avg, exp_avg_before), mask=touched)
        tl.store(exp_avg_sq_ptr + offsets, tl.where(selected, exp_avg_sq, exp_avg_sq_before), mask=touched)


@triton.jit
def _masked_sgd_kernel(p_ptr, grad_ptr, buf_ptr, mask_ptr,
                       n_rows, n_cols, n_col_blocks,
                       neg_lr, momentum, weight_decay,
                       HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                       MASK_KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       GROUP: tl.constexpr):
    offsets, selected, touched, any_selected = _selected_offsets(mask_ptr, n_rows, n_cols, n_col_blocks,
                                                                 MASK_KIND, BLOCK_R, BLOCK_C, GROUP)
    if any_selected:
        p_before = tl.load(p_ptr + offsets, mask=touched, other=0.0)
        p = p_before.to(tl.float32)
        direction = tl.load(grad_ptr + offsets, mask=selected, other=0.0).to(tl.float32) + weight_decay * p
        if HAS_MOMENTUM:
            buf_before = tl.load(buf_ptr + offsets, mask=touched, other=0.0)
            buf = buf_before * momentum + direction
            tl.store(buf_ptr + offsets, tl.where(selected, buf, buf_before), mask=touched)
            if NESTEROV:
                direction = direction + momentum * buf
            else:
                direction = buf
        p = p + neg_lr * direction
        tl.store(p_ptr + offsets, tl.where(selected, p.to(p_ptr.dtype.element_ty), p_before), mask=touched)


_masked_adamw = CachedLaunch(_masked_adamw_kernel)
_masked_sgd = CachedLaunch(_masked_sgd_kernel)


def _launch_geometry(p: torch.Tensor, mask: torch.Tensor | None, mask_dim: int | None):
    """(mask kind, mask as bytes, n_rows, n_cols, BLOCK_R, BLOCK_C, n_col_blocks, grid, GROUP)."""
    if mask is None:
        kind, n_rows, n_cols = _NO_MASK, 1, p.numel()
    elif mask_dim is None:
        kind, n_rows, n_cols = _ELEMENT, 1, p.numel()
    else:
        kind = _ROWS if mask_dim == 0 else _COLS
        n_rows, n_cols = p.shape
    tile = INTERPRETER_TILE if interpreting() else TILE
    block_c = min(next_power_of_2(max(n_cols, 1)), tile)
    block_r = min(next_power_of_2(max(n_rows, 1)), max(1, tile // block_c))
    n_col_blocks = cdiv(n_cols, block_c)
    grid = (cdiv(n_rows, block_r) * n_col_blocks,)
    mask_bytes = p if mask is None else mask.view(torch.uint8)  # p stands in as an unread pointer
    return kind, mask_bytes, n_rows, n_cols, block_r, block_c, n_col_blocks, grid, min(SECTOR_ENTRIES, block_c)


def masked_adamw(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 mask: torch.Tensor | None, mask_dim: int | None, *, step: int, lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float) -> None:
    """Launch the AdamW kernel on validated, contiguous tensors (see fibec.ops.masked_adamw_)."""
    if p.numel() == 0:
        return
    kind, mask_bytes, n_rows, n_cols, block_r, block_c, n_col_blocks, grid, group = _launch_geometry(p, mask, mask_dim)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    _masked_adamw[grid](
        p, grad, exp_avg, exp_avg_sq, mask_bytes, n_rows, n_cols, n_col_blocks,
        1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, bias_correction2**0.5, eps, -(lr / bias_correction1),
        MASK_KIND=kind, BLOCK_R=block_r, BLOCK_C=block_c, GROUP=group,
    )


def masked_sgd(p: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None, mask_dim: int | None, *, lr: float,
               momentum: float, buf: torch.Tensor | None, weight_decay: float, nesterov: bool) -> None:
    """Launch the SGD kernel on validated, contiguous tensors (see fibec.ops.masked_sgd_)."""
    if p.numel() == 0:
        return
    kind, mask_bytes, n_rows, n_cols, block_r, block_c, n_col_blocks, grid, group = _launch_geometry(p, mask, mask_dim)
    has_momentum = momentum != 0
    _masked_sgd[grid](
        p, grad, buf if has_momentum else p, mask_bytes, n_rows, n_cols, n_col_blocks,
        -lr, momentum, weight_decay,
        HAS_MOMENTUM=has_momentum, NESTEROV=nesterov, MASK_KIND=kind, BLOCK_R=block_r, BLOCK_C=block_c,
        GROUP=group,
    )
