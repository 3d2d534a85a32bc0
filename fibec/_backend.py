"""Which implementation an op runs: Triton kernels or the plain-PyTorch path.

FIBEC_BACKEND=auto (default): CUDA tensors go to Triton, CPU tensors to torch.
FIBEC_BACKEND=triton forces Triton; on CPU tensors that needs TRITON_INTERPRET=1.
FIBEC_BACKEND=torch forces the torch path everywhere.
"""
from __future__ import annotations

import os

import torch

_CHOICES = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """Decide, per call, whether an op on `tensor`'s device runs its Triton kernel."""
    choice = os.environ.get("FIBEC_BACKEND", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"FIBEC_BACKEND must be one of {_CHOICES}, got {choice!r}")
    if choice == "torch":
        return False
    if choice == "auto":
        return tensor.is_cuda
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            "FIBEC_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True
