"""Float64 torch.func oracles and input makers shared by the Fisher op tests.

Inputs are drawn on the CPU (the same values whatever the device) and moved to `device`; the
oracles run in float64 on the CPU.
"""
import pytest
import torch
from torch.func import grad, vmap

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


def make_inputs(shape, dtype, masked, seed, device="cpu"):
    N, T, I, O = shape
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, T, I, generator=gen).to(dtype)
    G = torch.randn(N, T, O, generator=gen).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(N, T, generator=gen) > 0.3
        mask[:, 0] = True  # no sample empty, so a sample-level error still shows
        mask = mask.to(device)
    return X.to(device), G.to(device), mask


def make_lora_factors(rank, I, O, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    A = (torch.randn(rank, I, generator=gen) / I**0.5).to(dtype)
    B = torch.randn(O, rank, generator=gen).to(dtype)
    return A.to(device), B.to(device)


def _mask64(mask, N, T):
    return torch.ones(N, T, dtype=torch.float64) if mask is None else mask.cpu().double()


def per_sample_weight_grads(X, G, mask):
    """dW_n [N,O,I] of loss_n = sum_t m_t <g_t, W x_t>, in float64 via torch.func (on the CPU)."""
    X64, G64 = X.cpu().double(), G.cpu().double()
    W = torch.zeros(G.shape[2], X.shape[2], dtype=torch.float64)

    def loss(W, x, g, m):
        return (m[:, None] * g * (x @ W.T)).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0, 0))(W, X64, G64, _mask64(mask, *X.shape[:2]))


def per_sample_lora_grads(X, G, A, B, scaling, mask):
    """(dA_n [N,r,I], dB_n [N,O,r]) of loss_n = sum_t m_t <g_t, s B A x_t>, float64 via torch.func."""
    def loss(A, B, x, g, m):
        return scaling * (m[:, None] * g * (x @ A.T @ B.T)).sum()

    return vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0))(
        A.cpu().double(), B.cpu().double(), X.cpu().double(), G.cpu().double(), _mask64(mask, *X.shape[:2]))


def assert_close(actual, expected, dtype):
    """fp32 result within the dtype's tolerance of the float64 oracle (relative to its largest entry)."""
    assert actual.dtype == torch.float32
    actual = actual.cpu()
    assert not actual.isnan().any()
    tol = TOL[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.cpu().double(), rtol=tol, atol=tol * max(scale, 1e-30))
