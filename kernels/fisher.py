"""Per-sample gradients of a linear layer, squared and summed, without writing them to memory.

For a linear layer with X [N,T,I] inputs and G [N,T,O] output gradients the per-sample weight
gradient is dW_n = G_n^T X_n. One kernel, `_squared_outer_kernel`, computes for any pair of
sequences L [N,T,Da], R [N,T,Db] the tile (s * L_n^T R_n) of each sample in fp32 registers and
reduces its square into the diagonal Fisher sum_n (s L_n^T R_n)**2 [Da,Db] and/or into per-tile,
per-sample partial squared norms (summed afterwards: deterministic, no atomics). Dense layers use
(L, R) = (G, X); LoRA (y += s B A x) first projects XA = X A^T and GB = G B ([N,T,r], fp32, masked
tokens zeroed) with `_project_kernel`, then runs (G, XA) -> F_B [O,r] and (X, GB) -> F_A^T [I,r].

The launchers take tensors that fibec.ops has already validated. Imports nothing from fibec.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_DIM = 64
BLOCK_TOKENS = 32
BLOCK_ROWS = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_flags(dtype: torch.dtype, mixed: bool) -> tuple[bool, str]:
    """(upcast operands to fp32 before tl.dot, input precision of fp32 dots).

    The interpreter's tl.dot on bf16 operands is wrong, and an fp32 projection meeting bf16/fp16
    inputs needs one operand dtype. fp32 inputs keep full fp32 products ("ieee"), not tf32.
    """
    upcast = mixed or (dtype == torch.bfloat16 and _interpreting())
    return upcast, "ieee" if dtype == torch.float32 else "tf32"


def _mask_arg(token_mask: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Pointer and (sample, token) strides of the token mask; bool is read as uint8."""
    if token_mask is None:
        return fallback, 0, 0
    mask = token_mask.view(torch.uint8) if token_mask.dtype == torch.bool else token_mask
    return mask, mask.stride(0), mask.stride(1)


@triton.jit
def _squared_outer_kernel(
    L, R, M, F, P,
    N, T, DA, DB, scale,
    stride_ln, stride_lt, stride_la,
    stride_rn, stride_rt, stride_rb,
    stride_mn, stride_mt,
    stride_fa, stride_fb,
    HAS_MASK: tl.constexpr, WRITE_FISHER: tl.constexpr, ACCUMULATE: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    a_in = offs_a < DA
    b_in = offs_b < DB
    fisher = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    # Sample bases advance as pointers (64-bit), so n * stride never overflows int32.
    l_n = L
    r_n = R
    m_n = M
    p_n = P + (pid_a * tl.num_programs(1) + pid_b).to(tl.int64) * N
    for n in range(N):
        grad = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_in = offs_t < T
            lhs = tl.load(l_n + offs_t[:, None] * stride_lt + offs_a[None, :] * stride_la,
                          mask=t_in[:, None] & a_in[None, :], other=0.0)
            rhs = tl.load(r_n + offs_t[:, None] * stride_rt + offs_b[None, :] * stride_rb,
                          mask=t_in[:, None] & b_in[None, :], other=0.0)
            if HAS_MASK:
                keep = tl.load(m_n + offs_t * stride_mt, mask=t_in, other=0) != 0
                lhs = tl.where(keep[:, None], lhs, tl.zeros_like(lhs))
            if UPCAST:
                lhs = lhs.to(tl.float32)
                rhs = rhs.to(tl.float32)
            grad = tl.dot(tl.trans(lhs), rhs, grad, input_precision=PRECISION)
        grad = grad * scale
        square = grad * grad
        if WRITE_FISHER:
            fisher += square
        if WRITE_PARTIAL:
            tl.store(p_n, tl.sum(tl.sum(square, axis=1), axis=0))
            p_n += 1
        l_n += stride_ln
        r_n += stride_rn
        m_n += stride_mn
    if WRITE_FISHER:
        f_ptrs = F + offs_a[:, None] * stride_fa + offs_b[None, :] * stride_fb
        f_in = a_in[:, None] & b_in[None, :]
        if ACCUMULATE:
            fisher += tl.load(f_ptrs, mask=f_in, other=0.0)
        tl.store(f_ptrs, fisher, mask=f_in)


@triton.jit
def _project_kernel(
    Z, W, M, Y,
    NT, T, K, RANK,
    stride_zn, stride_zt, stride_zk,
    stride_wk, stride_wr,
    stride_mn, stride_mt,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Y[n,t,:] = Z[n,t,:] @ W in fp32 ([NT, RANK] contiguous), rows of masked tokens zeroed."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < NT
    r_in = offs_r < RANK
    n = offs_m // T
    t = offs_m % T
    row = n * stride_zn + t * stride_zt
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        z = tl.load(Z + row[:, None] + offs_k[None, :] * stride_zk, mask=m_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(W + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr,
                    mask=k_in[:, None] & r_in[None, :], other=0.0)
        if UPCAST:
            z = z.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(z, w, acc, input_precision=PRECISION)
    if HAS_MASK:
        keep = tl.load(M + n * stride_mn + t * stride_mt, mask=m_in, other=0) != 0
        acc = tl.where(keep[:, None], acc, tl.zeros_like(acc))
    tl.store(Y + offs_m[:, None] * RANK + offs_r[None, :], acc, mask=m_in[:, None] & r_in[None, :])


def _squared_outer(L: torch.Tensor, R: torch.Tensor, *, fisher: torch.Tensor | None, fisher_strides: tuple[int, int],
                   token_mask: torch.Tensor | None, scale: float, accumulate: bool, partial: bool,
                   block_b: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Launch `_squared_outer_kernel`; returns the [tiles, N] partial squared norms when `partial`."""
    N, T, DA = L.shape
    DB = R.shape[2]
    grid = (triton.cdiv(DA, BLOCK_DIM), triton.cdiv(DB, block_b))
    partials = torch.empty(grid[0] * grid[1], N, dtype=torch.float32, device=L.device) if partial else None
    mask, stride_mn, stride_mt = _mask_arg(token_mask, L)
    upcast, precision = _dot_flags(dtype, mixed=L.dtype != R.dtype)
    dummy = partials if fisher is None else fisher
    _squared_outer_kernel[grid](
        L, R, mask, dummy, dummy if partials is None else partials,
        N, T, DA, DB, scale,
        *L.stride(), *R.stride(), stride_mn, stride_mt, *fisher_strides,
        HAS_MASK=token_mask is not None, WRITE_FISHER=fisher is not None, ACCUMULATE=accumulate,
        WRITE_PARTIAL=partial, UPCAST=upcast, PRECISION=precision,
        BLOCK_A=BLOCK_DIM, BLOCK_B=block_b, BLOCK_T=BLOCK_TOKENS,
    )
    return partials


def _project(Z: torch.Tensor, W: torch.Tensor, W_strides: tuple[int, int], rank: int,
             token_mask: torch.Tensor | None, block_r: int) -> torch.Tensor:
    """Z [N,T,K] @ W [K,rank] (given by strides) -> [N,T,rank] fp32 with masked tokens' rows zero."""
    N, T, K = Z.shape
    out = torch.empty(N, T, rank, dtype=torch.float32, device=Z.device)
    mask, stride_mn, stride_mt = _mask_arg(token_mask, Z)
    upcast, precision = _dot_flags(Z.dtype, mixed=False)
    _project_kernel[(triton.cdiv(N * T, BLOCK_ROWS),)](
        Z, W, mask, out,
        N * T, T, K, rank,
        *Z.stride(), *W_strides, stride_mn, stride_mt,
        HAS_MASK=token_mask is not None, UPCAST=upcast, PRECISION=precision,
        BLOCK_M=BLOCK_ROWS, BLOCK_K=BLOCK_DIM, BLOCK_R=block_r,
    )
    return out


def fisher_diag(X: torch.Tensor, G: torch.Tensor, token_mask: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """sum_n (G_n^T X_n)**2 -> [O,I] fp32, written into `out` (added to it when `accumulate`)."""
    O, I = G.shape[2], X.shape[2]
    if out is None:
        out = torch.empty(O, I, dtype=torch.float32, device=X.device)
    _squared_outer(G, X, fisher=out, fisher_strides=out.stride(), token_mask=token_mask, scale=1.0,
                   accumulate=accumulate, partial=False, block_b=BLOCK_DIM, dtype=X.dtype)
    return out


def lora_fisher_diag(X: torch.Tensor, G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                     token_mask: torch.Tensor | None = None, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                     accumulate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F_A [r,I], F_B [O,r], sqnorm [N]) fp32 of LoRA factors A [r,I], B [O,r]; see module docstring."""
    I, O, r = X.shape[2], G.shape[2], A.shape[0]
    block_r = max(16, triton.next_power_of_2(r))
    if out is None:
        out = (torch.empty(r, I, dtype=torch.float32, device=X.device),
               torch.empty(O, r, dtype=torch.float32, device=X.device))
    fisher_A, fisher_B = out
    XA = _project(X, A, (A.stride(1), A.stride(0)), r, token_mask, block_r)
    GB = _project(G, B, B.stride(), r, token_mask, block_r)
    partial_B = _squared_outer(G, XA, fisher=fisher_B, fisher_strides=fisher_B.stride(), token_mask=None,
                               scale=scaling, accumulate=accumulate, partial=True, block_b=block_r, dtype=X.dtype)
    partial_A = _squared_outer(X, GB, fisher=fisher_A, fisher_strides=(fisher_A.stride(1), fisher_A.stride(0)),
                               token_mask=None, scale=scaling, accumulate=accumulate, partial=True,
                               block_b=block_r, dtype=X.dtype)
    return fisher_A, fisher_B, partial_A.sum(0) + partial_B.sum(0)


def sample_sqnorms(X: torch.Tensor, G: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """||G_n^T X_n||_F^2 -> [N] fp32 by the direct path: per-tile partial sums, then reduced."""
    partials = _squared_outer(G, X, fisher=None, fisher_strides=(0, 0), token_mask=token_mask, scale=1.0,
                              accumulate=False, partial=True, block_b=BLOCK_DIM, dtype=X.dtype)
    return partials.sum(0)
