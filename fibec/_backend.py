"""Which implementation an op runs: Triton kernels or the plain-PyTorch path.

FIBEC_BACKEND=auto (default): CUDA tensors go to Triton, CPU tensors to torch.
FIBEC_BACKEND=triton forces Triton; on CPU tensors that needs TRITON_INTERPRET=1.
FIBEC_BACKEND=torch forces the torch path everywhere.

Triton installs on Linux only. Without it, auto runs CUDA tensors on the torch path (with one
warning) and FIBEC_BACKEND=triton is an error that says so.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

_CHOICES = ("auto", "triton", "torch")
_NO_TRITON = "the triton package is not installed (it installs on Linux only: pip install triton)"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    """True when the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _warn_cuda_without_triton() -> None:
    warnings.warn(f"CUDA tensors run fibec's torch path: {_NO_TRITON}", RuntimeWarning, stacklevel=3)


def use_triton(tensor: torch.Tensor) -> bool:
    """Decide, per call, whether an op on `tensor`'s device runs its Triton kernel."""
    choice = os.environ.get("FIBEC_BACKEND", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"FIBEC_BACKEND must be one of {_CHOICES}, got {choice!r}")
    if choice == "torch":
        return False
    if choice == "auto":
        if tensor.is_cuda and not triton_installed():
            _warn_cuda_without_triton()
            return False
        return tensor.is_cuda
    if not triton_installed():
        raise RuntimeError(f"FIBEC_BACKEND=triton cannot run: {_NO_TRITON}; set FIBEC_BACKEND=torch or auto")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            "FIBEC_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True
