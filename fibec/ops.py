"""The public fused ops: validate arguments, then dispatch to Triton or the torch path.

Every op checks shapes, dtypes and devices before any kernel launch and raises
ValueError/TypeError naming the offending argument. CUDA tensors run the Triton
kernels in fibec.kernels; CPU tensors run fibec.reference (see fibec._backend).
"""
from __future__ import annotations

import torch

from fibec import reference
from fibec._backend import use_triton
from fibec._checks import FLOAT_DTYPES, check_finite_scalar, check_same_device, check_shape, check_tensor

# ---- Fisher information (kernels/fisher.py) ---------------------------------------------
# X [N,T,I] layer inputs, G [N,T,O] loss gradients w.r.t. the layer outputs, token_mask [N,T].
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, *FLOAT_DTYPES)


def _check_layer_inputs(X: object, G: object, token_mask: object) -> tuple[int, int, int, int]:
    """Validate X, G and token_mask of a linear layer; returns (N, T, I, O)."""
    check_tensor("X", X, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("G", G, ndim=3, dtypes=FLOAT_DTYPES)
    N, T, I = X.shape
    O = G.shape[2]
    if G.shape[:2] != X.shape[:2]:
        raise ValueError(f"G must have shape (N, T, O) = ({N}, {T}, O) like X, got {tuple(G.shape)}")
    if G.dtype != X.dtype:
        raise TypeError(f"G must have the dtype of X ({X.dtype}), got {G.dtype}")
    if min(N, T, I, O) == 0:
        raise ValueError(f"X and G must be non-empty, got X {tuple(X.shape)} and G {tuple(G.shape)}")
    if token_mask is not None:
        check_tensor("token_mask", token_mask, ndim=2, dtypes=_MASK_DTYPES)
        check_shape("token_mask", token_mask, (N, T))
    check_same_device(X=X, G=G, token_mask=token_mask)
    if token_mask is not None and token_mask.dtype != torch.bool and not ((token_mask == 0) | (token_mask == 1)).all():
        raise ValueError("token_mask must hold only 0 and 1 (or be bool)")
    return N, T, I, O


def _check_out(name: str, out: object, shape: tuple[int, ...], device: torch.device) -> None:
    check_tensor(name, out, ndim=len(shape), dtypes=(torch.float32,), contiguous=True)
    check_shape(name, out, shape)
    if out.device != device:
        raise ValueError(f"{name} is on {out.device} but X is on {device}")


def fisher_diag(X: torch.Tensor, G: torch.Tensor, *, token_mask: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Diagonal empirical Fisher of a linear layer's weight, sum_n (G_n^T X_n)**2, as [O,I] fp32.

    X [N,T,I] and G [N,T,O] share one dtype of fp32/bf16/fp16; token_mask [N,T] (bool or 0/1)
    drops padding tokens. Per-sample gradients are never materialised. With `out` ([O,I] fp32,
    contiguous) the result is added into `out`, which is returned.
    """
    N, T, I, O = _check_layer_inputs(X, G, token_mask)
    if out is not None:
        _check_out("out", out, (O, I), X.device)
    if use_triton(X):
        from fibec.kernels import fisher as kernels

        return kernels.fisher_diag(X, G, token_mask, out=out, accumulate=out is not None)
    fisher = reference.fisher_diag(X, G, token_mask)
    return fisher if out is None else out.add_(fisher)


def lora_fisher_diag(X: torch.Tensor, G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, *,
                     token_mask: torch.Tensor | None = None,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diagonal Fisher of both LoRA factors and per-sample squared gradient norms, in one pass.

    For y += scaling * B A x with X [N,T,I], G [N,T,O], A [r,I], B [O,r] (one dtype of
    fp32/bf16/fp16): dA_n = s (G_n B)^T X_n, dB_n = s G_n^T (X_n A^T). Returns
    (F_A [r,I], F_B [O,r], sqnorm [N]) in fp32 with sqnorm_n = ||dA_n||^2 + ||dB_n||^2.
    With `out` = (F_A_out, F_B_out) the Fisher terms are added into those buffers and returned.
    """
    N, T, I, O = _check_layer_inputs(X, G, token_mask)
    check_tensor("A", A, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("B", B, ndim=2, dtypes=FLOAT_DTYPES)
    r = A.shape[0]
    if A.shape[1] != I or r == 0:
        raise ValueError(f"A must have shape (r, I) with I = {I} from X and r > 0, got {tuple(A.shape)}")
    check_shape("B", B, (O, r))
    for name, t in (("A", A), ("B", B)):
        if t.dtype != X.dtype:
            raise TypeError(f"{name} must have the dtype of X ({X.dtype}), got {t.dtype}")
    check_same_device(X=X, A=A, B=B)
    scaling = check_finite_scalar("scaling", scaling)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"out must be a tuple (F_A_out, F_B_out), got {type(out).__name__}")
        _check_out("out[0]", out[0], (r, I), X.device)
        _check_out("out[1]", out[1], (O, r), X.device)
    if use_triton(X):
        from fibec.kernels import fisher as kernels

        return kernels.lora_fisher_diag(X, G, A, B, scaling, token_mask, out=out, accumulate=out is not None)
    fisher_A, fisher_B, sqnorm = reference.lora_fisher_diag(X, G, A, B, scaling, token_mask)
    if out is None:
        return fisher_A, fisher_B, sqnorm
    return out[0].add_(fisher_A), out[1].add_(fisher_B), sqnorm


def sample_sqnorms(X: torch.Tensor, G: torch.Tensor, *, token_mask: torch.Tensor | None = None,
                   method: str = "auto") -> torch.Tensor:
    """Per-sample squared norms ||G_n^T X_n||_F^2 of a linear layer's weight gradient, [N] fp32.

    X [N,T,I], G [N,T,O], token_mask [N,T]. method "auto" picks the cheaper by FLOP count of the
    Gram path (T x T Grams, torch) and the direct path (Triton kernel on CUDA); "gram" or
    "direct" force one.
    """
    _, T, I, O = _check_layer_inputs(X, G, token_mask)
    if method not in ("auto", "gram", "direct"):
        raise ValueError(f'method must be "auto", "gram" or "direct", got {method!r}')
    if method == "auto":
        method = reference.sqnorm_method(T, I, O)
    if method == "direct" and use_triton(X):
        from fibec.kernels import fisher as kernels

        return kernels.sample_sqnorms(X, G, token_mask)
    return reference.sample_sqnorms(X, G, token_mask, method=method)


# ---- Masked optimizer steps (kernels/masked_update.py) ----------------------------------
