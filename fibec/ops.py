"""The public fused ops: validate arguments, then dispatch to Triton or the torch path.

Every op checks shapes, dtypes and devices before any kernel launch and raises
ValueError/TypeError naming the offending argument. CUDA tensors run the Triton
kernels in fibec.kernels; CPU tensors run fibec.reference (see fibec._backend).

On CUDA the Fisher kernels are autotuned on first use per layer shape (the matrix sizes; batch
and sequence length do not re-tune); results are bitwise reproducible within a process (fixed
reduction order, no atomics), and FIBEC_AUTOTUNE=0 pins one config so that every process
rounds alike.
"""
from __future__ import annotations

import torch

from fibec import reference
from fibec._backend import use_triton
from fibec._checks import FLOAT_DTYPES, check_int, check_number, check_same_device, check_shape, check_tensor

# ---- Fisher information (fibec/kernels/fisher.py) ---------------------------------------------
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
                out: torch.Tensor | None = None,
                with_sqnorms: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Diagonal empirical Fisher of a linear layer's weight, sum_n (G_n^T X_n)**2, as [O,I] fp32.

    X [N,T,I] and G [N,T,O] share one dtype of fp32/bf16/fp16; token_mask [N,T] (bool or 0/1)
    drops padding tokens. Per-sample gradients are never materialised. With `out` ([O,I] fp32,
    contiguous) the result is added into `out`, which is returned. With `with_sqnorms` the
    return is (fisher, sqnorm) with sqnorm [N] fp32 = ||G_n^T X_n||_F^2, what `sample_sqnorms`
    gives, taken from the same per-sample gradients instead of a second pass over X and G.
    """
    N, T, I, O = _check_layer_inputs(X, G, token_mask)
    if out is not None:
        _check_out("out", out, (O, I), X.device)
    if not isinstance(with_sqnorms, bool):
        raise TypeError(f"with_sqnorms must be a bool, got {type(with_sqnorms).__name__}")
    if use_triton(X):
        from fibec.kernels import fisher as kernels

        return kernels.fisher_diag(X, G, token_mask, out=out, accumulate=out is not None, with_sqnorms=with_sqnorms)
    result = reference.fisher_diag(X, G, token_mask, with_sqnorms=with_sqnorms)
    if out is None:
        return result
    if with_sqnorms:
        return out.add_(result[0]), result[1]
    return out.add_(result)


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
    scaling = check_number("scaling", scaling)
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


# ---- Masked optimizer steps (fibec/kernels/masked_update.py) ----------------------------------
# p [..] parameter, grad like p; fp32 optimizer state of p's shape; mask: None (dense), an element
# mask of p's shape, or a neuron mask over the rows (mask_dim 0) or columns (mask_dim 1) of a 2-D p.
_UPDATE_MASK_DTYPES = (torch.bool, torch.uint8)


def check_update_mask(p: torch.Tensor, mask: object, mask_dim: object, *, name: str = "mask") -> int | None:
    """Validate `mask` for parameter p; return None for an element mask, 0 (rows) or 1 (columns).

    A 1-D mask on a 2-D p is a neuron mask: its length tells rows from columns, and a square p
    needs `mask_dim` to say which. An element mask has p's shape and takes mask_dim None.
    """
    check_tensor(name, mask, dtypes=_UPDATE_MASK_DTYPES, contiguous=True)
    check_same_device(p=p, **{name: mask})
    if mask_dim is not None and (isinstance(mask_dim, bool) or mask_dim not in (0, 1)):
        raise ValueError(f"mask_dim must be None, 0 (rows) or 1 (columns), got {mask_dim!r}")
    if mask.shape == p.shape and (mask_dim is None or (p.dim() == 1 and mask_dim == 0)):
        return None
    if p.dim() != 2 or mask.dim() != 1:
        raise ValueError(f"{name} must have p's shape {tuple(p.shape)} (element mask) or, for a 2-D p, "
                         f"one entry per row or column (neuron mask), got {tuple(mask.shape)}")
    rows, cols = p.shape
    fits = [d for d, n in ((0, rows), (1, cols)) if mask.shape[0] == n]
    if not fits:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} matches neither the {rows} rows nor the "
                         f"{cols} columns of p {tuple(p.shape)}")
    if mask_dim is None:
        if len(fits) == 2:
            raise ValueError(f"mask_dim must be 0 (rows) or 1 (columns) for a 1-D {name} on square p "
                             f"{tuple(p.shape)}")
        return fits[0]
    if mask_dim not in fits:
        raise ValueError(f"mask_dim={mask_dim} needs {name} of length {p.shape[mask_dim]}, got {mask.shape[0]}")
    return mask_dim


def _check_param_and_grad(p: object, grad: object) -> None:
    check_tensor("p", p, dtypes=FLOAT_DTYPES)
    if p.layout != torch.strided:
        raise TypeError(f"p must be a dense (strided) tensor, got layout {p.layout}")
    check_tensor("p", p, contiguous=True)
    check_tensor("grad", grad, dtypes=(p.dtype,))
    if grad.layout != torch.strided:
        raise TypeError(f"grad must be a dense (strided) tensor, got layout {grad.layout}")
    check_tensor("grad", grad, contiguous=True)
    check_shape("grad", grad, p.shape)
    check_same_device(p=p, grad=grad)


def _check_state(name: str, value: object, p: torch.Tensor) -> None:
    check_tensor(name, value, dtypes=(torch.float32,), contiguous=True)
    check_shape(name, value, p.shape)
    check_same_device(p=p, **{name: value})
    if value.data_ptr() == p.data_ptr() and p.numel():
        raise ValueError(f"{name} must not share memory with p")


def masked_adamw_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  mask: torch.Tensor | None, *, step: int, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-8, weight_decay: float = 0.01, mask_dim: int | None = None) -> None:
    """In-place AdamW step (torch.optim.AdamW semantics) on the entries of p that `mask` selects.

    p: fp32/bf16/fp16, contiguous; grad: p's shape and dtype; exp_avg, exp_avg_sq: fp32 state of
    p's shape (the update is computed in fp32 and rounded into p). mask: bool/uint8 element mask of
    p's shape, a neuron mask [rows] or [cols] of a 2-D p (`mask_dim` 0/1 when p is square), or
    None for a dense step. `step`: shared step count including this update (bias correction).
    Entries the mask leaves unset keep p, exp_avg and exp_avg_sq bit-for-bit (on the GPU, element
    and column masks read them and write them back unchanged in groups of 8 around selected ones).
    """
    _check_param_and_grad(p, grad)
    _check_state("exp_avg", exp_avg, p)
    _check_state("exp_avg_sq", exp_avg_sq, p)
    mask_dim = None if mask is None else check_update_mask(p, mask, mask_dim)
    step = check_int("step", step, low=1)  # the step count after this update
    lr = check_number("lr", lr, low=0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1 = check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    beta2 = check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    eps = check_number("eps", eps, low=0.0, low_open=True)
    weight_decay = check_number("weight_decay", weight_decay, low=0.0)
    with torch.no_grad():
        if use_triton(p):
            from fibec.kernels.masked_update import masked_adamw

            masked_adamw(p, grad, exp_avg, exp_avg_sq, mask, mask_dim, step=step, lr=lr, beta1=beta1,
                         beta2=beta2, eps=eps, weight_decay=weight_decay)
        else:
            reference.masked_adamw_(p, grad, exp_avg, exp_avg_sq, mask, step=step, lr=lr, betas=(beta1, beta2),
                                    eps=eps, weight_decay=weight_decay, mask_dim=mask_dim)


def masked_sgd_(p: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None, *, lr: float,
                momentum: float = 0.0, buf: torch.Tensor | None = None, weight_decay: float = 0.0,
                nesterov: bool = False, mask_dim: int | None = None) -> None:
    """In-place SGD step (torch.optim.SGD semantics, dampening 0) on the entries of p that `mask` selects.

    p, grad, mask as in masked_adamw_. buf: fp32 momentum buffer of p's shape, required when
    momentum > 0 (start from zeros: the first step then sets buf = grad, as torch does), and
    ignored when momentum == 0. Entries the mask leaves unset keep p and buf bit-for-bit (written
    back unchanged as in masked_adamw_).
    """
    _check_param_and_grad(p, grad)
    mask_dim = None if mask is None else check_update_mask(p, mask, mask_dim)
    lr = check_number("lr", lr, low=0.0)
    momentum = check_number("momentum", momentum, low=0.0)
    weight_decay = check_number("weight_decay", weight_decay, low=0.0)
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True requires momentum > 0")
    if buf is not None:
        _check_state("buf", buf, p)
    elif momentum != 0:
        raise ValueError("buf (fp32 momentum buffer of p's shape, zeros at first) is required when momentum > 0")
    with torch.no_grad():
        if use_triton(p):
            from fibec.kernels.masked_update import masked_sgd

            masked_sgd(p, grad, mask, mask_dim, lr=lr, momentum=momentum, buf=buf, weight_decay=weight_decay,
                       nesterov=nesterov)
        else:
            reference.masked_sgd_(p, grad, mask, lr=lr, momentum=momentum, buf=buf, weight_decay=weight_decay,
                                  nesterov=nesterov, mask_dim=mask_dim)
