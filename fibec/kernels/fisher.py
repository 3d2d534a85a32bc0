"""Per-sample gradients of a linear layer, squared and summed, without writing them to memory.

For a linear layer with X [N,T,I] inputs and G [N,T,O] output gradients the per-sample weight
gradient is dW_n = G_n^T X_n. One kernel, `_squared_outer_kernel`, computes for any pair of
sequences L [N,T,Da], R [N,T,Db] the tile (s * L_n^T R_n) of each sample in fp32 registers and
reduces its square into the diagonal Fisher sum_n (s L_n^T R_n)**2 [Da,Db] and/or into per-tile,
per-sample partial squared norms (summed afterwards: deterministic, no atomics). Dense layers use
(L, R) = (G, X); LoRA (y += s B A x) first projects XA = X A^T and GB = G B ([N,T,r], fp32, masked
tokens zeroed) with `_project_kernel`, then runs (G, XA) -> F_B [O,r] and (X, GB) -> F_A^T [I,r].
Each kernel takes LoRA's two problems in one launch: at LLM sizes the op's time is its launches
(on an H200, 0.45 ms of host time a call against 0.08 ms of kernels with one launch per problem).

Few tiles (LoRA's O/64, or a small dense layer) would leave most SMs idle, so each tile's loop
over (sample, token) is split across programs (`_split_plan`): a split holds whole samples and
writes the sum of their squares, or a chunk of one sample's tokens and writes that sample's
unsquared partial gradient; `_reduce_splits_kernel` then adds the splits in a fixed order. The
split count comes from the shapes and the SM count, never from the tuned config.

Tile sizes, token block, warps and stages are autotuned per layer shape (one fixed config in
the interpreter, and under FIBEC_AUTOTUNE=0). The launchers take tensors that fibec.ops has
already validated. Imports nothing from fibec.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.testing
import triton.language as tl

from ._cache import CachedLaunch
from ._launch import cdiv, interpreting, next_power_of_2

TILES = (64, 128)
TOKEN_BLOCKS = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3, 4)
REDUCE_BLOCK = 1024
# Entries of PART one reducing program loads at once: split rows x BLOCK columns.
REDUCE_TILE = 4096
# Two fp32 accumulator tiles (the sample's gradient and the running Fisher) live in registers:
# past 128 of them per thread the compiler spills.
ACCUMULATOR_REGISTERS = 128


def _autotuning() -> bool:
    """Off in the interpreter (it would time each config as numpy runs) and under FIBEC_AUTOTUNE=0
    (tests, or the same config, hence the same rounding, in every process)."""
    return not interpreting() and os.environ.get("FIBEC_AUTOTUNE", "1") not in ("", "0")


def _max_shared_memory(device: torch.device) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


def _dot_flags(dtype: torch.dtype, mixed: bool) -> tuple[bool, str]:
    """(upcast operands to fp32 before tl.dot, input precision of fp32 dots).

    The interpreter's tl.dot on bf16 operands is wrong, and an fp32 projection meeting bf16/fp16
    inputs needs one operand dtype. fp32 inputs keep full fp32 products ("ieee"), not tf32.
    """
    upcast = mixed or (dtype == torch.bfloat16 and interpreting())
    return upcast, "ieee" if dtype == torch.float32 else "tf32"


def _mask_arg(token_mask: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Pointer and (sample, token) strides of the token mask; bool is read as uint8."""
    if token_mask is None:
        return fallback, 0, 0
    mask = token_mask.view(torch.uint8) if token_mask.dtype == torch.bool else token_mask
    return mask, mask.stride(0), mask.stride(1)


# ---- autotuning spaces ----------------------------------------------------------------------


def _outer_space(*, tiled_columns: bool) -> list[triton.Config]:
    """BLOCK_A x BLOCK_B x BLOCK_T x warps x stages; without `tiled_columns` (LoRA's rank
    columns, one block wide) the launcher passes BLOCK_B itself. The first is the fixed config."""
    column_tiles = TILES if tiled_columns else (None,)
    return [triton.Config({"BLOCK_A": a, "BLOCK_T": t, **({"BLOCK_B": b} if b else {})}, num_warps=w, num_stages=s)
            for a in TILES for b in column_tiles for t in TOKEN_BLOCKS for w in WARPS for s in STAGES]


def _project_space() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m in TILES for k in TILES for w in WARPS for s in STAGES]


def _oversized(block: int, size: int, smallest: int) -> bool:
    """A block larger than the smallest choice although half of it already covers `size`."""
    return block > smallest and size <= block // 2


def _prune_outer(configs, named_args, **kwargs):
    """Keep the configs that can pay off and fit: no tile or token block twice what the shape
    needs, the two accumulator tiles within ACCUMULATOR_REGISTERS per thread, the pipeline's
    stages within the device's shared memory."""
    L, R = named_args["L"], named_args["R"]
    tokens = min(named_args["T"], named_args["tokens_per_split"])
    shared = _max_shared_memory(L.device)
    kept = []
    for config in configs:
        block_a, block_t = config.kwargs["BLOCK_A"], config.kwargs["BLOCK_T"]
        block_b = config.kwargs.get("BLOCK_B", kwargs.get("BLOCK_B"))
        staged = config.num_stages * block_t * (block_a * L.element_size() + block_b * R.element_size())
        if (_oversized(block_a, max(named_args["DA"], named_args["DA2"]), TILES[0])
                or ("BLOCK_B" in config.kwargs and _oversized(block_b, named_args["DB"], TILES[0]))
                or _oversized(block_t, tokens, TOKEN_BLOCKS[0])
                or 2 * block_a * block_b > ACCUMULATOR_REGISTERS * 32 * config.num_warps
                or staged > shared):
            continue
        kept.append(config)
    return kept


def _prune_project(configs, named_args, **kwargs):
    Z, W = named_args["Z"], named_args["W"]
    shared = _max_shared_memory(Z.device)
    return [c for c in configs
            if not _oversized(c.kwargs["BLOCK_K"], max(named_args["K"], named_args["K2"]), TILES[0])
            and not _oversized(c.kwargs["BLOCK_M"], named_args["NT"], TILES[0])
            and c.num_stages * c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] * Z.element_size()
                                                     + kwargs["BLOCK_R"] * W.element_size()) <= shared]


def _time_config(kernel_call, quantiles):
    """Triton's timer with a short budget (5 ms warm-up, 20 ms of runs, not 25 and 100): a
    federated client tunes each layer shape once, while it trains, over tens of configs."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _autotune(space: list[triton.Config], **options):
    return triton.autotune(configs=space if _autotuning() else space[:1], do_bench=_time_config, **options)


# ---- kernels ------------------------------------------------------------------------------------


@triton.jit
def _scaled_square(grad, scale, sqnorm_ptr, WRITE_SQNORM: tl.constexpr):
    """(grad * scale) ** 2 of one sample's finished gradient block; with WRITE_SQNORM its sum (the
    block's share of the sample's squared norm) is stored at sqnorm_ptr."""
    scaled = grad * scale
    square = scaled * scaled
    if WRITE_SQNORM:
        tl.store(sqnorm_ptr, tl.sum(square))
    return square


@triton.jit
def _squared_outer_kernel(
    L, R, M, OUT, SQNORM, L2, R2, OUT2,
    N, T, DA, DB, DA2, scale, samples_per_split, tokens_per_split,
    stride_ln, stride_lt, stride_la,
    stride_rn, stride_rt, stride_rb,
    stride_mn, stride_mt,
    stride_os, stride_oa, stride_ob,
    stride_l2n, stride_l2t, stride_l2a,
    stride_o2s, stride_o2a, stride_o2b,
    HAS_MASK: tl.constexpr, SQUARE: tl.constexpr, WRITE_OUT: tl.constexpr, ACCUMULATE: tl.constexpr,
    WRITE_SQNORM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One (BLOCK_A, BLOCK_B) tile of L_n^T R_n over split program_id(2) of the (sample, token) loop.

    Two products share a launch (LoRA's two factors): the first cdiv(DA, BLOCK_A) programs of
    axis 0 compute (L, R) -> OUT, the next cdiv(DA2, BLOCK_A) (L2, R2) -> OUT2, both with R's
    strides and the same N, T, DB. DA2 = 0 leaves one product.

    SQUARE (the split holds whole samples): each sample's tile, scaled, is squared once its tokens
    are summed; the squares go to SQNORM[tile, n] (summed) and are summed over the split's samples
    into OUT[split] (added to OUT's values when ACCUMULATE). Otherwise the split holds a chunk of
    one sample's tokens, and OUT[split] gets that chunk's unscaled, unsquared gradient.
    """
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    tile_row = pid_a * tl.num_programs(1) + pid_b
    # Both branches bind every name: a stride the first product has as a compile-time 1 stays one
    # (and its loads vectorised) only when the second has it too.
    first_tiles = tl.cdiv(DA, BLOCK_A)
    if pid_a < first_tiles:
        lhs_base, rhs_base, out_base, rows = L, R, OUT, DA
        stride_n, stride_t, stride_a = stride_ln, stride_lt, stride_la
        out_s, out_a, out_b = stride_os, stride_oa, stride_ob
    else:
        lhs_base, rhs_base, out_base, rows = L2, R2, OUT2, DA2
        stride_n, stride_t, stride_a = stride_l2n, stride_l2t, stride_l2a
        out_s, out_a, out_b = stride_o2s, stride_o2a, stride_o2b
        pid_a -= first_tiles
    split = tl.program_id(2)
    token_splits = tl.cdiv(T, tokens_per_split)
    n_start = (split // token_splits) * samples_per_split
    t_start = (split % token_splits) * tokens_per_split
    t_stop = tl.minimum(t_start + tokens_per_split, T)
    blocks_per_sample = tl.cdiv(t_stop - t_start, BLOCK_T)
    samples = tl.minimum(samples_per_split, N - n_start)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    a_in = offs_a < rows
    b_in = offs_b < DB
    total = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    grad = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    # One flat loop over (sample, token block) keeps the software pipeline full across samples.
    for step in range(samples * blocks_per_sample):
        n = n_start + step // blocks_per_sample
        offs_t = t_start + (step % blocks_per_sample) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_in = offs_t < t_stop
        # 64-bit sample offsets: n * stride can pass 2**31 on large batches.
        lhs = tl.load(lhs_base + n.to(tl.int64) * stride_n + offs_t[:, None] * stride_t + offs_a[None, :] * stride_a,
                      mask=t_in[:, None] & a_in[None, :], other=0.0)
        rhs = tl.load(rhs_base + n.to(tl.int64) * stride_rn + offs_t[:, None] * stride_rt + offs_b[None, :] * stride_rb,
                      mask=t_in[:, None] & b_in[None, :], other=0.0)
        if HAS_MASK:
            keep = tl.load(M + n.to(tl.int64) * stride_mn + offs_t * stride_mt, mask=t_in, other=0) != 0
            lhs = tl.where(keep[:, None], lhs, tl.zeros_like(lhs))
        if UPCAST:
            lhs = lhs.to(tl.float32)
            rhs = rhs.to(tl.float32)
        grad = tl.dot(tl.trans(lhs), rhs, grad, input_precision=PRECISION)
        if step % blocks_per_sample == blocks_per_sample - 1:
            if SQUARE:
                total += _scaled_square(grad, scale, SQNORM + tile_row * N + n, WRITE_SQNORM)
            else:
                total += grad
            grad = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    if WRITE_OUT:
        out_ptrs = out_base + split.to(tl.int64) * out_s + offs_a[:, None] * out_a + offs_b[None, :] * out_b
        out_in = a_in[:, None] & b_in[None, :]
        if ACCUMULATE:
            total += tl.load(out_ptrs, mask=out_in, other=0.0)
        tl.store(out_ptrs, total, mask=out_in)


@triton.jit
def _reduce_splits_kernel(
    PART, F, F2, SQNORM,
    N, splits, size, DA, DB, scale, stride_fa, stride_fb, stride_f2a, stride_f2b,
    SQUARE: tl.constexpr, WRITE_FISHER: tl.constexpr, ACCUMULATE: tl.constexpr, WRITE_SQNORM: tl.constexpr,
    BLOCK: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
):
    """Finish a split `_squared_outer_kernel` launch on BLOCK entries of the [rows, DB] result.

    PART is [N, splits, rows, DB] contiguous, rows = DA + DA2 when the launch held two products;
    SPLIT_BLOCK splits are loaded at once and summed by tl.sum, chunk after chunk (a fixed
    order: deterministic, no atomics; one split at a time made a long chain of dependent loads
    when a small layer has many token splits). With SQUARE, sample n's gradient chunks are
    summed, scaled and squared (the squares' sum to SQNORM[block, n]) before the samples are
    summed; else N is 1 and the splits are Fisher sums. Rows below DA go to F, the others to F2
    (both strided; added to their values when ACCUMULATE).
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < size
    split_offs = tl.arange(0, SPLIT_BLOCK)
    fisher = tl.zeros((BLOCK,), dtype=tl.float32)
    for n in range(N):
        value = tl.zeros((BLOCK,), dtype=tl.float32)
        for first in range(0, splits, SPLIT_BLOCK):
            rows = first + split_offs
            part = PART + (n * splits + rows).to(tl.int64)[:, None] * size + offs[None, :]
            value += tl.sum(tl.load(part, mask=(rows < splits)[:, None] & inside[None, :], other=0.0), axis=0)
        if SQUARE:
            value = _scaled_square(value, scale, SQNORM + pid * N + n, WRITE_SQNORM)
        fisher += value
    if WRITE_FISHER:
        row, column = offs // DB, offs % DB
        in_first, in_second = inside & (row < DA), inside & (row >= DA)
        f_ptrs = F + row * stride_fa + column * stride_fb
        f2_ptrs = F2 + (row - DA) * stride_f2a + column * stride_f2b
        if ACCUMULATE:
            fisher += tl.load(f_ptrs, mask=in_first, other=0.0) + tl.load(f2_ptrs, mask=in_second, other=0.0)
        tl.store(f_ptrs, fisher, mask=in_first)
        tl.store(f2_ptrs, fisher, mask=in_second)


@triton.jit
def _project_kernel(
    Z, W, Z2, W2, M, Y,
    NT, T, K, K2, RANK,
    stride_zn, stride_zt, stride_zk,
    stride_wk, stride_wr,
    stride_z2n, stride_z2t, stride_z2k,
    stride_w2k, stride_w2r,
    stride_mn, stride_mt,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Y[p,n,t,:] = Z_p[n,t,:] @ W_p in fp32 (Y [2, NT, RANK] contiguous), rows of masked tokens
    zeroed: p = program_id(1) picks (Z, W) or (Z2, W2), LoRA's two projections in one launch."""
    # Both branches bind every name, so that unit strides stay compile-time constants.
    if tl.program_id(1) == 0:
        Z_p, W_p, K_p = Z, W, K
        stride_n, stride_t, stride_k = stride_zn, stride_zt, stride_zk
        stride_wk_p, stride_wr_p = stride_wk, stride_wr
    else:
        Z_p, W_p, K_p = Z2, W2, K2
        stride_n, stride_t, stride_k = stride_z2n, stride_z2t, stride_z2k
        stride_wk_p, stride_wr_p = stride_w2k, stride_w2r
    Y += tl.program_id(1).to(tl.int64) * NT * RANK
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < NT
    r_in = offs_r < RANK
    n = offs_m // T
    t = offs_m % T
    row = n * stride_n + t * stride_t
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K_p, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K_p
        z = tl.load(Z_p + row[:, None] + offs_k[None, :] * stride_k, mask=m_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(W_p + offs_k[:, None] * stride_wk_p + offs_r[None, :] * stride_wr_p,
                    mask=k_in[:, None] & r_in[None, :], other=0.0)
        if UPCAST:
            z = z.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(z, w, acc, input_precision=PRECISION)
    if HAS_MASK:
        keep = tl.load(M + n * stride_mn + t * stride_mt, mask=m_in, other=0) != 0
        acc = tl.where(keep[:, None], acc, tl.zeros_like(acc))
    tl.store(Y + offs_m[:, None] * RANK + offs_r[None, :], acc, mask=m_in[:, None] & r_in[None, :])


# Keyed on the matrix sizes alone: the batches of a training run vary in samples and tokens, and
# each new key would time the whole space again (seconds per layer shape). The pruner sees the
# first batch's token count; a config chosen there is right, if not always fastest, for others.
# OUT and OUT2 are restored after each timed run: with ACCUMULATE the kernel adds into them.
# Dense layers tile both dimensions; LoRA's rank columns take one block chosen by the launcher.
_OUTER_TUNING = dict(key=["DA", "DB", "DA2"], prune_configs_by={"early_config_prune": _prune_outer},
                     restore_value=["OUT", "OUT2"])
_dense_outer = CachedLaunch(_autotune(_outer_space(tiled_columns=True), **_OUTER_TUNING)(_squared_outer_kernel))
_lora_outer = CachedLaunch(_autotune(_outer_space(tiled_columns=False), **_OUTER_TUNING)(_squared_outer_kernel))
# NT only sets the grid: it stays out of the key so that every batch reuses the choice.
_projection = CachedLaunch(_autotune(_project_space(), key=["K", "K2", "RANK"],
                                     prune_configs_by={"early_config_prune": _prune_project})(_project_kernel))
_reduce_splits = CachedLaunch(_reduce_splits_kernel)


# ---- launch planning ----------------------------------------------------------------------------


def _split_budget(device: torch.device) -> tuple[int, int]:
    """(programs that keep the device busy, fewest tokens worth a program of their own).

    CUDA: four programs per SM, and 128 tokens (a few BLOCK_T steps). The interpreter: 8 and 16,
    so that the tests' small shapes take every split path.
    """
    if device.type != "cuda":
        return 8, 16
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count, 128


def _split_plan(N: int, T: int, tiles: int, budget: tuple[int, int]) -> tuple[int, int, int]:
    """(samples_per_split, tokens_per_split, splits) sharing out each tile's (sample, token) loop.

    Splits are added until `tiles * splits` reaches the budget's program count: whole samples
    per split while the samples give at least half of the splits wanted, else chunks of one
    sample's tokens, no shorter than the budget's token count. Both sizes are powers of two; a
    size past N or T means that loop is not split.
    """
    programs, min_tokens = budget
    wanted = cdiv(programs, tiles)
    whole_tokens = next_power_of_2(T)
    if 2 * N >= wanted:
        samples = next_power_of_2(cdiv(N, wanted))
        return samples, whole_tokens, cdiv(N, samples)
    tokens = max(min_tokens, next_power_of_2(cdiv(T, cdiv(wanted, N))))
    tokens = min(tokens, whole_tokens)
    return 1, tokens, N * cdiv(T, tokens)


class _Product(NamedTuple):
    """One L^T R of a `_squared_outer` launch: L [N,T,DA], R [N,T,DB] and where its Fisher goes
    (None, or a [DA,DB] view given by its strides)."""
    L: torch.Tensor
    R: torch.Tensor
    fisher: torch.Tensor | None
    fisher_strides: tuple[int, int]


def _squared_outer(products: tuple[_Product, ...], *, token_mask: torch.Tensor | None, scale: float,
                   accumulate: bool, sqnorm: bool, rank_block: int | None = None) -> torch.Tensor | None:
    """sum_n (scale L_n^T R_n)**2 into each product's `fisher` (added to it when `accumulate`),
    and/or the [rows, N] partial squared norms of all products when `sqnorm` (the caller sums
    the rows), in one launch and at most one second pass.

    One or two products; two (LoRA's factors) share N, T, DB, L's dtype and R's strides, and
    either both have a Fisher buffer or neither. rank_block: the one column block of LoRA's rank
    columns; None tiles both dimensions.
    """
    (L, R, fisher, fisher_strides), (L2, R2, fisher2, fisher2_strides) = products[0], products[-1]
    N, T, DA = L.shape
    DB = R.shape[2]
    DA2 = L2.shape[2] if len(products) == 2 else 0
    kernel = _dense_outer if rank_block is None else _lora_outer
    # Grid and norm rows are counted with the smallest tile of the space: an autotuned larger
    # tile uses fewer programs and rows (the rest stay zero), never more.
    tiles = (cdiv(DA, TILES[0]) + cdiv(DA2, TILES[0])) * cdiv(DB, rank_block or TILES[0])
    budget = _split_budget(L.device)
    samples_per_split, tokens_per_split, splits = _split_plan(N, T, tiles, budget)
    whole_samples = tokens_per_split >= T
    partials = None
    if splits > 1 and (fisher is not None or not whole_samples):
        # The products' rows stacked: [splits, DA + DA2, DB].
        partials = torch.empty(splits, DA + DA2, DB, dtype=torch.float32, device=L.device)
    tile_norms = torch.zeros(tiles, N, dtype=torch.float32, device=L.device) if sqnorm and whole_samples else None
    if partials is not None:
        target, target2 = partials, partials[:, DA:]
        target_strides = target2_strides = partials.stride()
    elif fisher is not None:
        target, target2 = fisher, fisher2
        target_strides, target2_strides = (0, *fisher_strides), (0, *fisher2_strides)
    else:  # norms only: OUT (restored around each autotuning run) is pointed at the small norm buffer
        target, target2, target_strides, target2_strides = tile_norms, tile_norms, (0, 0, 0), (0, 0, 0)
    placeholder = L  # stands in for pointers a launch never reads
    mask, stride_mn, stride_mt = _mask_arg(token_mask, placeholder)
    upcast, precision = _dot_flags(L.dtype, mixed=L.dtype != R.dtype)
    extra = {} if rank_block is None else {"BLOCK_B": rank_block}
    kernel[lambda meta: (cdiv(DA, meta["BLOCK_A"]) + cdiv(DA2, meta["BLOCK_A"]), cdiv(DB, meta["BLOCK_B"]), splits)](
        L, R, mask, target, placeholder if tile_norms is None else tile_norms, L2, R2, target2,
        N, T, DA, DB, DA2, scale, samples_per_split, tokens_per_split,
        *L.stride(), *R.stride(), stride_mn, stride_mt, *target_strides, *L2.stride(), *target2_strides,
        HAS_MASK=token_mask is not None, SQUARE=whole_samples, WRITE_OUT=partials is not None or fisher is not None,
        ACCUMULATE=accumulate and partials is None, WRITE_SQNORM=tile_norms is not None,
        UPCAST=upcast, PRECISION=precision, **extra,
    )
    if partials is None:
        return tile_norms
    # Whole samples: N=1 group of `splits` Fisher sums. Token chunks: N groups, one per sample.
    groups = 1 if whole_samples else N
    size = (DA + DA2) * DB
    # Blocks narrow enough to give every program slot one (small layers), as many splits at once
    # as fit REDUCE_TILE.
    block = min(REDUCE_BLOCK, max(128, next_power_of_2(cdiv(size, budget[0]))))
    split_block = min(next_power_of_2(splits // groups), REDUCE_TILE // block)
    blocks = cdiv(size, block)
    block_norms = torch.empty(blocks, N, dtype=torch.float32, device=L.device) if sqnorm and not whole_samples else None
    _reduce_splits[(blocks,)](
        partials, placeholder if fisher is None else fisher, placeholder if fisher2 is None else fisher2,
        placeholder if block_norms is None else block_norms,
        groups, splits // groups, size, DA, DB, scale, *fisher_strides, *fisher2_strides,
        SQUARE=not whole_samples, WRITE_FISHER=fisher is not None, ACCUMULATE=accumulate,
        WRITE_SQNORM=block_norms is not None, BLOCK=block, SPLIT_BLOCK=split_block,
    )
    return tile_norms if whole_samples else block_norms


def _project(X: torch.Tensor, G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, token_mask: torch.Tensor | None,
             rank_block: int) -> torch.Tensor:
    """[XA, GB] = [X A^T, G B] -> [2, N, T, r] fp32 with masked tokens' rows zero, in one launch."""
    N, T, I = X.shape
    O, rank = G.shape[2], A.shape[0]
    out = torch.empty(2, N, T, rank, dtype=torch.float32, device=X.device)
    mask, stride_mn, stride_mt = _mask_arg(token_mask, X)
    upcast, precision = _dot_flags(X.dtype, mixed=False)
    _projection[lambda meta: (cdiv(N * T, meta["BLOCK_M"]), 2)](
        X, A, G, B, mask, out,
        N * T, T, I, O, rank,
        *X.stride(), A.stride(1), A.stride(0), *G.stride(), *B.stride(), stride_mn, stride_mt,
        HAS_MASK=token_mask is not None, UPCAST=upcast, PRECISION=precision, BLOCK_R=rank_block,
    )
    return out


# ---- the ops --------------------------------------------------------------------------------------


def fisher_diag(X: torch.Tensor, G: torch.Tensor, token_mask: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, accumulate: bool = False,
                with_sqnorms: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """sum_n (G_n^T X_n)**2 -> [O,I] fp32, written into `out` (added to it when `accumulate`);
    with `with_sqnorms` also ||G_n^T X_n||^2 -> [N] fp32 from the same pass."""
    O, I = G.shape[2], X.shape[2]
    if out is None:
        out = torch.empty(O, I, dtype=torch.float32, device=X.device)
    norms = _squared_outer((_Product(G, X, out, out.stride()),), token_mask=token_mask, scale=1.0,
                           accumulate=accumulate, sqnorm=with_sqnorms)
    return (out, norms.sum(0)) if with_sqnorms else out


def lora_fisher_diag(X: torch.Tensor, G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                     token_mask: torch.Tensor | None = None, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                     accumulate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F_A [r,I], F_B [O,r], sqnorm [N]) fp32 of LoRA factors A [r,I], B [O,r]; see module docstring.

    Three launches at most (both projections, both squared outer products, their second pass):
    at LLM sizes the op is bound by its launches, not by its kernels.
    """
    I, O, r = X.shape[2], G.shape[2], A.shape[0]
    rank_block = max(16, next_power_of_2(r))
    if out is None:
        out = (torch.empty(r, I, dtype=torch.float32, device=X.device),
               torch.empty(O, r, dtype=torch.float32, device=X.device))
    fisher_A, fisher_B = out
    XA, GB = _project(X, G, A, B, token_mask, rank_block)
    norms = _squared_outer((_Product(G, XA, fisher_B, fisher_B.stride()),
                            _Product(X, GB, fisher_A, (fisher_A.stride(1), fisher_A.stride(0)))),
                           token_mask=None, scale=scaling, accumulate=accumulate, sqnorm=True, rank_block=rank_block)
    return fisher_A, fisher_B, norms.sum(0)


def sample_sqnorms(X: torch.Tensor, G: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """||G_n^T X_n||_F^2 -> [N] fp32 by the direct path: per-tile partial sums, then reduced."""
    return _squared_outer((_Product(G, X, None, (0, 0)),), token_mask=token_mask, scale=1.0, accumulate=False,
                          sqnorm=True).sum(0)
