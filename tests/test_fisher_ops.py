"""fisher_diag, lora_fisher_diag and sample_sqnorms against float64 torch.func per-sample gradients."""
import pytest
import torch
from torch.func import grad, vmap

from fibec import ops, reference
from fibec.kernels import fisher as fisher_kernels

# (N, T, I, O): single sample/token, sizes off every block (64 dims, 32 tokens, 64 rows).
SHAPES = [(1, 1, 5, 3), (2, 1, 33, 65), (1, 19, 70, 77), (5, 123, 77, 70)]
LORA_CASES = [((1, 1, 5, 3), 1), ((2, 9, 33, 65), 8), ((5, 123, 77, 70), 16), ((3, 40, 70, 17), 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty buffer starts as NaN, so an entry an op forgets to write fails the test."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        buf = real_empty(*args, **kwargs)
        return buf.fill_(float("nan")) if buf.is_floating_point() else buf

    monkeypatch.setattr(torch, "empty", nan_empty)


def make_inputs(shape, dtype, masked, seed):
    N, T, I, O = shape
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, T, I, generator=gen).to(dtype)
    G = torch.randn(N, T, O, generator=gen).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(N, T, generator=gen) > 0.3
        mask[:, 0] = True  # no sample empty, so a sample-level error still shows
    return X, G, mask


def _mask64(mask, N, T):
    return torch.ones(N, T, dtype=torch.float64) if mask is None else mask.double()


def per_sample_weight_grads(X, G, mask):
    """dW_n [N,O,I] of loss_n = sum_t m_t <g_t, W x_t>, in float64 via torch.func."""
    X64, G64 = X.double(), G.double()
    W = torch.zeros(G.shape[2], X.shape[2], dtype=torch.float64)

    def loss(W, x, g, m):
        return (m[:, None] * g * (x @ W.T)).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0, 0))(W, X64, G64, _mask64(mask, *X.shape[:2]))


def per_sample_lora_grads(X, G, A, B, scaling, mask):
    """(dA_n [N,r,I], dB_n [N,O,r]) of loss_n = sum_t m_t <g_t, s B A x_t>, float64 via torch.func."""
    def loss(A, B, x, g, m):
        return scaling * (m[:, None] * g * (x @ A.T @ B.T)).sum()

    return vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0))(
        A.double(), B.double(), X.double(), G.double(), _mask64(mask, *X.shape[:2]))


def assert_close(actual, expected, dtype):
    assert actual.dtype == torch.float32
    assert not actual.isnan().any()
    tol = TOL[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * max(scale, 1e-30))


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fisher_diag_matches_per_sample_grads_squared(backend, poisoned_empty, shape, dtype, masked):
    X, G, mask = make_inputs(shape, dtype, masked, seed=hash((shape, masked)) % 2**31)
    expected = per_sample_weight_grads(X, G, mask).square().sum(0)
    assert_close(ops.fisher_diag(X, G, token_mask=mask), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fisher_diag_accumulates_into_out(backend, dtype):
    X, G, mask = make_inputs((3, 37, 70, 67), dtype, True, seed=1)
    fisher = per_sample_weight_grads(X, G, mask).square().sum(0)
    initial = torch.rand(67, 70, dtype=torch.float32) * fisher.max().float()
    out = initial.clone()
    assert ops.fisher_diag(X, G, token_mask=mask, out=out) is out
    ops.fisher_diag(X, G, token_mask=mask, out=out)
    assert_close(out, initial.double() + 2 * fisher, dtype)


def test_fisher_diag_ignores_masked_token_values(backend):
    X, G, mask = make_inputs((2, 40, 17, 9), torch.float32, True, seed=2)
    X_garbage, G_garbage = X.clone(), G.clone()
    X_garbage[~mask] = 1e4
    G_garbage[~mask] = -1e4
    torch.testing.assert_close(ops.fisher_diag(X_garbage, G_garbage, token_mask=mask),
                               ops.fisher_diag(X, G, token_mask=mask), rtol=1e-5, atol=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float32], ids=str)
def test_token_mask_accepts_bool_and_zero_one_dtypes(backend, mask_dtype):
    X, G, mask = make_inputs((2, 21, 17, 9), torch.float32, True, seed=3)
    expected = per_sample_weight_grads(X, G, mask).square().sum(0)
    assert_close(ops.fisher_diag(X, G, token_mask=mask.to(mask_dtype)), expected, torch.float32)


def test_fisher_diag_accepts_non_contiguous_inputs(backend):
    X, G, _ = make_inputs((3, 21, 17, 9), torch.float32, False, seed=4)
    X_t = X.transpose(0, 1).contiguous().transpose(0, 1)
    G_t = G[:, :, torch.arange(9)].mT.contiguous().mT
    assert not X_t.is_contiguous() and not G_t.is_contiguous()
    assert_close(ops.fisher_diag(X_t, G_t), per_sample_weight_grads(X, G, None).square().sum(0), torch.float32)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,rank", LORA_CASES, ids=str)
def test_lora_fisher_diag_matches_per_sample_grads(backend, poisoned_empty, shape, rank, dtype, masked):
    X, G, mask = make_inputs(shape, dtype, masked, seed=hash((shape, rank, masked)) % 2**31)
    gen = torch.Generator().manual_seed(rank)
    A = (torch.randn(rank, shape[2], generator=gen) / shape[2] ** 0.5).to(dtype)
    B = torch.randn(shape[3], rank, generator=gen).to(dtype)
    scaling = 2.0 / rank
    dA, dB = per_sample_lora_grads(X, G, A, B, scaling, mask)
    fisher_A, fisher_B, sqnorm = ops.lora_fisher_diag(X, G, A, B, scaling, token_mask=mask)
    assert fisher_A.shape == (rank, shape[2]) and fisher_B.shape == (shape[3], rank) and sqnorm.shape == (shape[0],)
    assert_close(fisher_A, dA.square().sum(0), dtype)
    assert_close(fisher_B, dB.square().sum(0), dtype)
    assert_close(sqnorm, dA.square().sum((1, 2)) + dB.square().sum((1, 2)), dtype)


def test_lora_fisher_diag_accumulates_into_out(backend):
    X, G, mask = make_inputs((3, 37, 70, 67), torch.float32, True, seed=5)
    A, B = torch.randn(8, 70) / 8, torch.randn(67, 8)
    dA, dB = per_sample_lora_grads(X, G, A, B, 0.5, mask)
    init_A, init_B = torch.rand(8, 70), torch.rand(67, 8)
    out = (init_A.clone(), init_B.clone())
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
def test_sample_sqnorms_matches_per_sample_grad_norms(backend, poisoned_empty, shape, dtype, masked, method):
    X, G, mask = make_inputs(shape, dtype, masked, seed=hash((shape, masked)) % 2**31)
    expected = per_sample_weight_grads(X, G, mask).square().sum((1, 2))
    assert_close(ops.sample_sqnorms(X, G, token_mask=mask, method=method), expected, dtype)


@pytest.mark.parametrize("T,I,O,method", [(4, 512, 512, "gram"), (512, 64, 64, "direct"), (1, 1, 1, "direct")])
def test_sqnorm_method_picks_fewer_flops(T, I, O, method):
    assert reference.sqnorm_method(T, I, O) == method


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_overwrite_every_entry_of_a_nan_buffer(dtype):
    """The op's out-less path hands the launcher an uninitialised buffer with accumulate=False."""
    X, G, mask = make_inputs((2, 33, 70, 67), dtype, True, seed=6)
    A, B = (torch.randn(3, 70) / 8).to(dtype), torch.randn(67, 3).to(dtype)
    out = torch.full((67, 70), float("nan"))
    fisher_kernels.fisher_diag(X, G, mask, out=out, accumulate=False)
    assert_close(out, per_sample_weight_grads(X, G, mask).square().sum(0), dtype)
    lora_out = (torch.full((3, 70), float("nan")), torch.full((67, 3), float("nan")))
    fisher_kernels.lora_fisher_diag(X, G, A, B, 1.5, mask, out=lora_out, accumulate=False)
    dA, dB = per_sample_lora_grads(X, G, A, B, 1.5, mask)
    assert_close(lora_out[0], dA.square().sum(0), dtype)
    assert_close(lora_out[1], dB.square().sum(0), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_gives_same_result_one_sample_per_chunk(monkeypatch, dtype):
    X, G, mask = make_inputs((4, 37, 70, 67), dtype, True, seed=7)
    A, B = (torch.randn(5, 70) / 8).to(dtype), torch.randn(67, 5).to(dtype)
    whole = (reference.fisher_diag(X, G, mask), *reference.lora_fisher_diag(X, G, A, B, 0.3, mask),
             reference.sample_sqnorms(X, G, mask, method="gram"), reference.sample_sqnorms(X, G, mask, method="direct"))
    monkeypatch.setattr(reference, "_CHUNK_BYTES", 1)
    chunked = (reference.fisher_diag(X, G, mask), *reference.lora_fisher_diag(X, G, A, B, 0.3, mask),
               reference.sample_sqnorms(X, G, mask, method="gram"), reference.sample_sqnorms(X, G, mask, method="direct"))
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
