import os

import torch

# Without a GPU every Triton kernel runs in the interpreter; must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests' matmuls are tiny: spinning up intra-op threads costs more than it saves, and under
# pytest-xdist each worker has one core anyway.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run the test once on the torch path and once on the Triton kernels."""
    monkeypatch.setenv("FIBEC_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
