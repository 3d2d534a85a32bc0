"""fisher_diag, lora_fisher_diag and sample_sqnorms against float64 torch.func per-sample gradients.

Inputs live on the `device` fixture's device (CUDA where there is one), so on a GPU machine the
triton backend runs the compiled kernels; without one, the interpreter.
"""
import pytest
import torch
from fisher_oracle import (DTYPES, assert_close, make_inputs, make_lora_factors, per_sample_lora_grads,
                           per_sample_weight_grads, poisoned_empty)  # noqa: F401 (poisoned_empty: fixture)

from fibec import ops, reference

# (N, T, I, O): single sample/token, sizes off every block (64 dims, 32 tokens, 64 rows).
SHAPES = [(1, 1, 5, 3), (2, 1, 33, 65), (1, 19, 70, 77), (5, 123, 77, 70)]
LORA_CASES = [((1, 1, 5, 3), 1), ((2, 9, 33, 65), 8), ((5, 123, 77, 70), 16), ((3, 40, 70, 17), 1)]


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fisher_diag_matches_per_sample_grads_squared(backend, device, poisoned_empty, shape, dtype, masked):
    X, G, mask = make_inputs(shape, dtype, masked, seed=hash((shape, masked)) % 2**31, device=device)
    expected = per_sample_weight_grads(X, G, mask).square().sum(0)
    assert_close(ops.fisher_diag(X, G, token_mask=mask), expected, dtype)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fisher_diag_with_sqnorms_gives_both_from_one_pass(backend, device, poisoned_empty, shape, dtype, masked):
    X, G, mask = make_inputs(shape, dtype, masked, seed=hash((shape, masked, 1)) % 2**31, device=device)
    dW = per_sample_weight_grads(X, G, mask)
    fisher, sqnorm = ops.fisher_diag(X, G, token_mask=mask, with_sqnorms=True)
    assert_close(fisher, dW.square().sum(0), dtype)
    assert_close(sqnorm, dW.square().sum((1, 2)), dtype)


def test_fisher_diag_with_sqnorms_accumulates_the_fisher_only(backend, device):
    X, G, mask = make_inputs((3, 37, 70, 67), torch.float32, True, seed=3, device=device)
    dW = per_sample_weight_grads(X, G, mask)
    initial = torch.rand(67, 70) * dW.square().sum(0).max().float()
    out = initial.to(device, copy=True)
    fisher, sqnorm = ops.fisher_diag(X, G, token_mask=mask, out=out, with_sqnorms=True)
    assert fisher is out
    assert_close(out, initial.double() + dW.square().sum(0), torch.float32)
    assert_close(sqnorm, dW.square().sum((1, 2)), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fisher_diag_accumulates_into_out(backend, device, dtype):
    X, G, mask = make_inputs((3, 37, 70, 67), dtype, True, seed=1, device=device)
    fisher = per_sample_weight_grads(X, G, mask).square().sum(0)
    initial = torch.rand(67, 70, dtype=torch.float32) * fisher.max().float()
    out = initial.to(device, copy=True)
    assert ops.fisher_diag(X, G, token_mask=mask, out=out) is out
    ops.fisher_diag(X, G, token_mask=mask, out=out)
    assert_close(out, initial.double() + 2 * fisher, dtype)


def test_fisher_diag_ignores_masked_token_values(backend, device):
    X, G, mask = make_inputs((2, 40, 17, 9), torch.float32, True, seed=2, device=device)
    X_garbage, G_garbage = X.clone(), G.clone()
    X_garbage[~mask] = 1e4
    G_garbage[~mask] = -1e4
    torch.testing.assert_close(ops.fisher_diag(X_garbage, G_garbage, token_mask=mask),
                               ops.fisher_diag(X, G, token_mask=mask), rtol=1e-5, atol=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32], ids=str)
def test_token_mask_accepts_bool_and_zero_one_dtypes(backend, device, mask_dtype):
    X, G, mask = make_inputs((2, 21, 17, 9), torch.float32, True, seed=3, device=device)
    expected = per_sample_weight_grads(X, G, mask).square().sum(0)
    assert_close(ops.fisher_diag(X, G, token_mask=mask.to(mask_dtype)), expected, torch.float32)


def test_fisher_diag_accepts_non_contiguous_inputs(backend, device):
    X, G, _ = make_inputs((3, 21, 17, 9), torch.float32, False, seed=4, device=device)
    X_t = X.transpose(0, 1).contiguous().transpose(0, 1)
    G_t = G[:, :, torch.arange(9, device=device)].mT.contiguous().mT
    assert not X_t.is_contiguous() and not G_t.is_contiguous()
    assert_close(ops.fisher_diag(X_t, G_t), per_sample_weight_grads(X, G, None).square().sum(0), torch.float32)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,rank", LORA_CASES, ids=str)
def test_lora_fisher_diag_matches_per_sample_grads(backend, device, poisoned_empty, shape, rank, dtype, masked):
    X, G, mask = make_inputs(shape, dtype, masked, seed=hash((shape, rank, masked)) % 2**31, device=device)
    A, B = make_lora_factors(rank, shape[2], shape[3], dtype, seed=rank, device=device)
    scaling = 2.0 / rank
    dA, dB = per_sample_lora_grads(X, G, A, B, scaling, mask)
    fisher_A, fisher_B, sqnorm = ops.lora_fisher_diag(X, G, A, B, scaling, token_mask=mask)
    assert fisher_A.shape == (rank, shape[2]) and fisher_B.shape == (shape[3], rank) and sqnorm.shape == (shape[0],)
    assert_close(fisher_A, dA.square().sum(0), dtype)
    assert_close(fisher_B, dB.square().sum(0), dtype)
    assert_close(sqnorm, dA.square().sum((1, 2)) + dB.square().sum((1, 2)), dtype)


def test_lora_fisher_diag_accumulates_into_out(backend, device):
    X, G, mask = make_inputs((3, 37, 70, 67), torch.float32, True, seed=5, device=device)
    A, B = make_lora_factors(8, 70, 67, torch.float32, seed=5, device=device)
    dA, dB = per_sample_lora_grads(X, G, A, B, 0.5, mask)
    init_A, init_B = torch.rand(8, 70), torch.rand(67, 8)
    out = (init_A.to(device, copy=True), init_B.to(device, copy=True))
    fisher_A, fisher_B, _ = ops.lora_fisher_diag(X, G, A, B, 0.5, token_mask=mask, out=out)
    assert fisher_A is out[0] and fisher_B is out[1]
    _, _, sqnorm = ops.lora_fisher_diag(X, G, A, B, 0.5, token_mask=mask, out=out)
    assert_close(out[0], init_A.double() + 2 * dA.square().sum(0), torch.float32)
    assert_close(out[1], init_B.double() + 2 * dB.square().sum(0), torch.float32)
    assert_close(sqnorm, dA.square().sum((1, 2)) + dB.square().sum((1, 2)), torch.float32)


@pytest.mark.parametrize("method", ["auto", "gram", "direct"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 5, 3), (5, 123, 77, 70), (3, 4, 70, 65)], ids=str)
def test_sample_sqnorms_matches_per_sample_grad_norms(backend, device, poisoned_empty, shape, dtype, masked, method):
    X, G, mask = make_inputs(shape, dtype, masked, seed=hash((shape, masked)) % 2**31, device=device)
    expected = per_sample_weight_grads(X, G, mask).square().sum((1, 2))
    assert_close(ops.sample_sqnorms(X, G, token_mask=mask, method=method), expected, dtype)


@pytest.mark.parametrize("T,I,O,method", [(4, 512, 512, "gram"), (512, 64, 64, "direct"), (1, 1, 1, "direct")])
def test_sqnorm_method_picks_fewer_flops(T, I, O, method):
    assert reference.sqnorm_method(T, I, O) == method


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_gives_same_result_one_sample_per_chunk(monkeypatch, device, dtype):
    X, G, mask = make_inputs((4, 37, 70, 67), dtype, True, seed=7, device=device)
    A, B = make_lora_factors(5, 70, 67, dtype, seed=7, device=device)
    def every_output():
        return (*reference.fisher_diag(X, G, mask, with_sqnorms=True), *reference.lora_fisher_diag(X, G, A, B, 0.3, mask),
                reference.sample_sqnorms(X, G, mask, method="gram"), reference.sample_sqnorms(X, G, mask, method="direct"))
    whole = every_output()
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 1)
    chunked = every_output()
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
