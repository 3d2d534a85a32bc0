"""How the Triton Fisher kernels are launched: split (sample, token) loops, tuned configs, determinism.

Every launch plan must give the float64 oracle's result: each split mode (forced through the
`_split_budget` hook), each config of the tuning space (pinned through the tuned kernels'
`configs`), a NaN-filled result buffer, and `out=` accumulation. Small odd shapes only: these
run in the interpreter without a GPU.
"""
import math

import pytest
import torch
import triton
from fisher_oracle import (DTYPES, assert_close, make_inputs, make_lora_factors, per_sample_lora_grads,
                           per_sample_weight_grads, poisoned_empty)  # noqa: F401 (poisoned_empty: fixture)

from fibec import ops
from fibec.kernels import fisher as fisher_kernels

SHAPE = (3, 37, 70, 67)  # N, T, I, O: 2 x 2 tiles of 64, T off every token block
RANK = 5
# (programs wanted, fewest tokens per split[, REDUCE_TILE]) -> how `_split_plan` shares out each
# tile's loop (and how many splits the second pass loads at once).
BUDGETS = {
    "default": None,  # the interpreter's own budget
    "unsplit": (1, 1),  # one program per tile
    "one-sample-splits": (10**6, 10**6),  # one split per sample, squared in the first pass
    "token-chunks": (10**6, 16),  # 16-token chunks, squared after the second pass
    "token-chunks-reduced-in-pairs": (10**6, 16, 256),  # 3 chunks a sample, summed 2 + 1 (masked)
}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("FIBEC_BACKEND", "triton")


def use_budget(monkeypatch, budget):
    if budget is not None:
        monkeypatch.setattr(fisher_kernels, "_split_budget", lambda device: budget[:2])
        if len(budget) == 3:
            monkeypatch.setattr(fisher_kernels, "REDUCE_TILE", budget[2])


def lora_expected(X, G, A, B, scaling, mask):
    dA, dB = per_sample_lora_grads(X, G, A, B, scaling, mask)
    return dA.square().sum(0), dB.square().sum(0), dA.square().sum((1, 2)) + dB.square().sum((1, 2))


def run_all_ops(X, G, A, B, mask):
    """Every Fisher op once, each output in a fresh buffer."""
    return (ops.fisher_diag(X, G, token_mask=mask), *ops.lora_fisher_diag(X, G, A, B, 0.7, token_mask=mask),
            ops.sample_sqnorms(X, G, token_mask=mask, method="direct"))


# ---- the plan --------------------------------------------------------------------------------


def covered(N, T, plan):
    """How often each (sample, token) is visited by the splits, replaying the kernel's indexing."""
    samples_per_split, tokens_per_split, splits = plan
    counts = torch.zeros(N, T, dtype=torch.int64)
    token_splits = math.ceil(T / tokens_per_split)
    for split in range(splits):
        n0 = (split // token_splits) * samples_per_split
        t0 = (split % token_splits) * tokens_per_split
        counts[n0:min(n0 + samples_per_split, N), t0:min(t0 + tokens_per_split, T)] += 1
    return counts


@pytest.mark.parametrize("budget", [(1, 1), (8, 16), (528, 128), (10**6, 1)], ids=str)
def test_split_plan_visits_every_sample_and_token_once(budget):
    for N in (1, 2, 5, 8):
        for T in (1, 7, 16, 33, 300):
            for tiles in (1, 3, 64):
                plan = fisher_kernels._split_plan(N, T, tiles, budget)
                samples_per_split, tokens_per_split, _ = plan
                assert samples_per_split == triton.next_power_of_2(samples_per_split)
                assert tokens_per_split == triton.next_power_of_2(tokens_per_split)
                assert samples_per_split == 1 or tokens_per_split >= T  # token chunks hold one sample
                assert torch.equal(covered(N, T, plan), torch.ones(N, T, dtype=torch.int64)), (N, T, tiles, plan)


@pytest.mark.parametrize("N,T,tiles,plan", [
    (8, 512, 64, (1, 512, 8)),  # lora_fisher_diag r=16, O = 4096: 64 tiles x 8 one-sample splits
    (8, 4096, 1, (1, 128, 256)),  # fisher_diag 64 x 64: 8 samples x 32 chunks of 128 tokens
    (8, 512, 4096, (8, 512, 1)),  # fisher_diag 4096 x 4096: enough tiles, no split
    (1, 100, 1, (1, 128, 1)),  # too few tokens to share out
])
def test_split_plan_fills_a_132_sm_gpu(N, T, tiles, plan):
    assert fisher_kernels._split_plan(N, T, tiles, (4 * 132, 128)) == plan


def test_prune_keeps_configs_that_fit_and_pay_off(monkeypatch):
    monkeypatch.setattr(fisher_kernels, "_max_shared_memory", lambda device: 227 * 1024)
    space = fisher_kernels._outer_space(tiled_columns=True)

    def kept(dtype, T, DA, DB):
        L, R = torch.empty(1, 1, 1, dtype=dtype), torch.empty(1, 1, 1, dtype=dtype)
        named = {"L": L, "R": R, "T": T, "tokens_per_split": T, "DA": DA, "DB": DB, "DA2": 0}
        return {(c.kwargs["BLOCK_A"], c.kwargs["BLOCK_B"], c.kwargs["BLOCK_T"], c.num_warps, c.num_stages)
                for c in fisher_kernels._prune_outer(space, named)}

    large = kept(torch.bfloat16, 512, 4096, 4096)
    assert (128, 128, 64, 8, 4) in large and (64, 64, 32, 4, 2) in large
    assert not any(a == b == 128 and warps == 4 for a, b, _, warps, _ in large)  # accumulators would spill
    assert (128, 128, 64, 8, 4) not in kept(torch.float32, 512, 4096, 4096)  # 256 KiB of stages
    small = kept(torch.float32, 20, 60, 50)
    assert {(a, b, t) for a, b, t, _, _ in small} == {(64, 64, 32)}


# ---- every plan gives the oracle's result -----------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 5, 3), SHAPE], ids=str)
def test_fisher_diag_every_split_mode(monkeypatch, device, poisoned_empty, shape, dtype, budget):
    use_budget(monkeypatch, budget)
    X, G, mask = make_inputs(shape, dtype, True, seed=11, device=device)
    expected = per_sample_weight_grads(X, G, mask).square().sum(0)
    O, I = shape[3], shape[2]
    nan_out = torch.full((O, I), float("nan"), device=device)
    fisher_kernels.fisher_diag(X, G, mask, out=nan_out, accumulate=False)
    assert_close(nan_out, expected, dtype)
    initial = torch.rand(O, I) * expected.max().float()
    out = initial.to(device, copy=True)
    assert ops.fisher_diag(X, G, token_mask=mask, out=out) is out
    assert_close(out, initial.double() + expected, dtype)
    assert_close(ops.sample_sqnorms(X, G, token_mask=mask, method="direct"),
                 per_sample_weight_grads(X, G, mask).square().sum((1, 2)), dtype)
    fused_out = torch.full((O, I), float("nan"), device=device)
    _, sqnorm = fisher_kernels.fisher_diag(X, G, mask, out=fused_out, with_sqnorms=True)
    assert_close(fused_out, expected, dtype)
    assert_close(sqnorm, per_sample_weight_grads(X, G, mask).square().sum((1, 2)), dtype)


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 5, 3), SHAPE], ids=str)
def test_lora_fisher_diag_every_split_mode(monkeypatch, device, poisoned_empty, shape, dtype, budget):
    use_budget(monkeypatch, budget)
    N, T, I, O = shape
    X, G, mask = make_inputs(shape, dtype, True, seed=12, device=device)
    A, B = make_lora_factors(RANK, I, O, dtype, seed=12, device=device)
    fisher_A, fisher_B, sqnorm = lora_expected(X, G, A, B, 1.5, mask)
    nan_out = (torch.full((RANK, I), float("nan"), device=device), torch.full((O, RANK), float("nan"), device=device))
    _, _, sqnorm_got = fisher_kernels.lora_fisher_diag(X, G, A, B, 1.5, mask, out=nan_out, accumulate=False)
    assert_close(nan_out[0], fisher_A, dtype)
    assert_close(nan_out[1], fisher_B, dtype)
    assert_close(sqnorm_got, sqnorm, dtype)
    init_A, init_B = torch.rand(RANK, I) * fisher_A.max().float(), torch.rand(O, RANK) * fisher_B.max().float()
    out = (init_A.to(device, copy=True), init_B.to(device, copy=True))
    ops.lora_fisher_diag(X, G, A, B, 1.5, token_mask=mask, out=out)
    assert_close(out[0], init_A.double() + fisher_A, dtype)
    assert_close(out[1], init_B.double() + fisher_B, dtype)


class CountedLaunches:
    """Wraps a kernel (or autotuner): `kernel[grid](...)` launches it and counts the launch."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("budget,launches", [
    ("unsplit", {"_projection": 1, "_lora_outer": 1}),
    ("one-sample-splits", {"_projection": 1, "_lora_outer": 1, "_reduce_splits": 1}),
    ("token-chunks", {"_projection": 1, "_lora_outer": 1, "_reduce_splits": 1}),
])
def test_lora_fisher_diag_launches_each_kernel_once_for_both_factors(monkeypatch, device, budget, launches):
    """The op is bound by its launches at LLM sizes: both factors share every launch."""
    use_budget(monkeypatch, BUDGETS[budget])
    counts = {}
    for name in ("_projection", "_lora_outer", "_dense_outer", "_reduce_splits"):
        monkeypatch.setattr(fisher_kernels, name, CountedLaunches(getattr(fisher_kernels, name), counts, name))
    X, G, mask = make_inputs(SHAPE, torch.float32, True, seed=16, device=device)
    A, B = make_lora_factors(RANK, SHAPE[2], SHAPE[3], torch.float32, seed=16, device=device)
    got = fisher_kernels.lora_fisher_diag(X, G, A, B, 0.7, mask)
    assert counts == launches
    for value, want in zip(got, lora_expected(X, G, A, B, 0.7, mask)):
        assert_close(value, want, torch.float32)


@pytest.mark.parametrize("budget,launches", [
    ("unsplit", {"_dense_outer": 1}),
    ("one-sample-splits", {"_dense_outer": 1, "_reduce_splits": 1}),
    ("token-chunks", {"_dense_outer": 1, "_reduce_splits": 1}),
])
def test_fisher_diag_with_sqnorms_is_one_pass(monkeypatch, device, budget, launches):
    """The per-sample norms come from the Fisher's own pass, not from a second one."""
    use_budget(monkeypatch, BUDGETS[budget])
    counts = {}
    for name in ("_dense_outer", "_reduce_splits"):
        monkeypatch.setattr(fisher_kernels, name, CountedLaunches(getattr(fisher_kernels, name), counts, name))
    X, G, mask = make_inputs(SHAPE, torch.float32, True, seed=17, device=device)
    fisher, sqnorm = fisher_kernels.fisher_diag(X, G, mask, with_sqnorms=True)
    assert counts == launches
    dW = per_sample_weight_grads(X, G, mask)
    assert_close(fisher, dW.square().sum(0), torch.float32)
    assert_close(sqnorm, dW.square().sum((1, 2)), torch.float32)


# ---- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_identical_run_to_run_and_close_across_split_counts(monkeypatch, device, dtype):
    X, G, mask = make_inputs(SHAPE, dtype, True, seed=13, device=device)
    A, B = make_lora_factors(RANK, SHAPE[2], SHAPE[3], dtype, seed=13, device=device)
    results = {}
    for name, budget in BUDGETS.items():
        with monkeypatch.context() as patch:
            use_budget(patch, budget)
            first, second = run_all_ops(X, G, A, B, mask), run_all_ops(X, G, A, B, mask)
        for a, b in zip(first, second):
            assert torch.equal(a, b), name  # fixed reduction order, no atomics
        results[name] = first
    # Across split counts only the order of fp32 additions differs.
    for name, got in results.items():
        for a, b in zip(got, results["unsplit"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


# ---- every config of the tuning space ----------------------------------------------------------


def pick(space, **kwargs):
    return next(c for c in space if all(c.kwargs.get(k) == v for k, v in kwargs.items()))


DENSE_SPACE = fisher_kernels._outer_space(tiled_columns=True)
LORA_SPACE = fisher_kernels._outer_space(tiled_columns=False)
PROJECT_SPACE = fisher_kernels._project_space()
CONFIGS = {  # (dense tile, LoRA tile, projection): every tile size and token block at least once
    "64x64-t32": (pick(DENSE_SPACE, BLOCK_A=64, BLOCK_B=64, BLOCK_T=32), pick(LORA_SPACE, BLOCK_A=64, BLOCK_T=32),
                  pick(PROJECT_SPACE, BLOCK_M=64, BLOCK_K=64)),
    "128x64-t64": (pick(DENSE_SPACE, BLOCK_A=128, BLOCK_B=64, BLOCK_T=64), pick(LORA_SPACE, BLOCK_A=128, BLOCK_T=64),
                   pick(PROJECT_SPACE, BLOCK_M=128, BLOCK_K=64)),
    "64x128-t64": (pick(DENSE_SPACE, BLOCK_A=64, BLOCK_B=128, BLOCK_T=64), pick(LORA_SPACE, BLOCK_A=64, BLOCK_T=64),
                   pick(PROJECT_SPACE, BLOCK_M=64, BLOCK_K=128)),
    "128x128-t32": (pick(DENSE_SPACE, BLOCK_A=128, BLOCK_B=128, BLOCK_T=32),
                    pick(LORA_SPACE, BLOCK_A=128, BLOCK_T=32), pick(PROJECT_SPACE, BLOCK_M=128, BLOCK_K=128)),
    "64x64-t128": (pick(DENSE_SPACE, BLOCK_A=64, BLOCK_B=64, BLOCK_T=128), pick(LORA_SPACE, BLOCK_A=64, BLOCK_T=128),
                   pick(PROJECT_SPACE, BLOCK_M=64, BLOCK_K=64)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("configs", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_tile_and_token_block_matches_reference(monkeypatch, device, configs, dtype):
    for launcher, config in zip((fisher_kernels._dense_outer, fisher_kernels._lora_outer,
                                 fisher_kernels._projection), configs):
        monkeypatch.setattr(launcher.kernel, "configs", [config])
        launcher.forget()
    X, G, mask = make_inputs(SHAPE, dtype, True, seed=14, device=device)
    A, B = make_lora_factors(RANK, SHAPE[2], SHAPE[3], dtype, seed=14, device=device)
    fisher, fisher_A, fisher_B, lora_sqnorm, sqnorm = run_all_ops(X, G, A, B, mask)
    dW = per_sample_weight_grads(X, G, mask)
    assert_close(fisher, dW.square().sum(0), dtype)
    assert_close(sqnorm, dW.square().sum((1, 2)), dtype)
    for got, want in zip((fisher_A, fisher_B, lora_sqnorm), lora_expected(X, G, A, B, 0.7, mask)):
        assert_close(got, want, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning times configs on a GPU")
def test_autotuning_over_the_whole_space_matches_reference(monkeypatch, device):
    """Every config the pruner keeps is compiled and timed. One sample gives one split, whose
    kernel adds into `out` itself: that must be restored after each timed run."""
    for launcher, space in ((fisher_kernels._dense_outer, DENSE_SPACE), (fisher_kernels._lora_outer, LORA_SPACE),
                            (fisher_kernels._projection, PROJECT_SPACE)):
        monkeypatch.setattr(launcher.kernel, "configs", space)
        monkeypatch.setattr(launcher.kernel, "cache", {})
        launcher.forget()
    shape = (1, 20, 60, 50)
    X, G, mask = make_inputs(shape, torch.bfloat16, True, seed=15, device=device)
    A, B = make_lora_factors(RANK, 60, 50, torch.bfloat16, seed=15, device=device)
    expected = per_sample_weight_grads(X, G, mask).square().sum(0)
    initial = torch.rand(50, 60) * expected.max().float()
    out = initial.to(device, copy=True)
    ops.fisher_diag(X, G, token_mask=mask, out=out)
    assert_close(out, initial.double() + expected, torch.bfloat16)
    for got, want in zip(ops.lora_fisher_diag(X, G, A, B, 0.7, token_mask=mask),
                         lora_expected(X, G, A, B, 0.7, mask)):
        assert_close(got, want, torch.bfloat16)
    assert fisher_kernels._dense_outer.kernel.cache and fisher_kernels._lora_outer.kernel.cache  # tuned, not pinned
