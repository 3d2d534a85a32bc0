"""Which path an op takes: FIBEC_BACKEND, CUDA or not, and Triton installed or not (Linux only)."""
import types
import warnings

import pytest
import torch
from fisher_oracle import assert_close, make_inputs, per_sample_weight_grads

from fibec import _backend, ops

CPU = torch.zeros(1)
CUDA_LIKE = types.SimpleNamespace(is_cuda=True)  # use_triton only asks where the tensor lives


@pytest.fixture
def without_triton(monkeypatch):
    monkeypatch.setattr(_backend, "triton_installed", lambda: False)
    _backend._warn_cuda_without_triton.cache_clear()
    yield
    _backend._warn_cuda_without_triton.cache_clear()


@pytest.mark.parametrize("choice, tensor, expected", [
    ("auto", CPU, False), ("auto", CUDA_LIKE, True), ("torch", CPU, False), ("torch", CUDA_LIKE, False),
    ("triton", CUDA_LIKE, True), ("TRITON", CUDA_LIKE, True),
])
def test_backend_choice_follows_the_setting_and_the_device(monkeypatch, choice, tensor, expected):
    monkeypatch.setenv("FIBEC_BACKEND", choice)
    assert _backend.use_triton(tensor) is expected


def test_unknown_backend_is_an_error_naming_the_setting(monkeypatch):
    monkeypatch.setenv("FIBEC_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FIBEC_BACKEND must be one of"):
        _backend.use_triton(CPU)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("FIBEC_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.use_triton(CPU)


def test_cuda_without_triton_runs_the_torch_path_and_warns_once(monkeypatch, without_triton):
    monkeypatch.setenv("FIBEC_BACKEND", "auto")
    with pytest.warns(RuntimeWarning, match="triton package is not installed"):
        assert _backend.use_triton(CUDA_LIKE) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_triton(CUDA_LIKE) is False


def test_forced_triton_without_triton_fails_before_any_kernel(monkeypatch, without_triton):
    monkeypatch.setenv("FIBEC_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    X, G = torch.randn(2, 3, 5), torch.randn(2, 3, 7)
    with pytest.raises(RuntimeError, match=r"installs on Linux only: pip install triton.*FIBEC_BACKEND=torch"):
        ops.fisher_diag(X, G)


def test_cpu_ops_need_no_triton(monkeypatch, without_triton):
    monkeypatch.setenv("FIBEC_BACKEND", "auto")
    X, G, mask = make_inputs((2, 3, 5, 7), torch.float32, masked=True, seed=0)
    assert_close(ops.fisher_diag(X, G, token_mask=mask), per_sample_weight_grads(X, G, mask).square().sum(0),
                 torch.float32)
