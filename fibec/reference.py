"""Plain-PyTorch implementations of every fused op: the CPU path and the test oracle.

Imports nothing but torch.
"""
from __future__ import annotations

import torch

# ---- Fisher information -----------------------------------------------------------------
# X [N,T,I] layer inputs, G [N,T,O] loss gradients w.r.t. the layer outputs; per-sample weight
# gradient dW_n = G_n^T X_n. Samples are processed in chunks so that the per-sample gradients of
# one chunk (and fp32 copies of its inputs) stay under _CHUNK_BYTES: [N,O,I] never exists at once.
_CHUNK_BYTES = 8 * 2**20


def _samples_per_chunk(X: torch.Tensor, G: torch.Tensor, token_mask: torch.Tensor | None,
                       work_floats_per_sample: int) -> int:
    """Samples per chunk so that one chunk's fp32 work buffers and input copies fit _CHUNK_BYTES."""
    T, I, O = X.shape[1], X.shape[2], G.shape[2]
    copied = (I if X.dtype != torch.float32 else 0) + (O if G.dtype != torch.float32 or token_mask is not None else 0)
    return max(1, _CHUNK_BYTES // (4 * (T * copied + work_floats_per_sample)))


def _fp32_chunk(X: torch.Tensor, G: torch.Tensor, token_mask: torch.Tensor | None,
                start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 views/copies of samples [start, stop) with masked tokens' gradient rows zeroed."""
    x = X[start:stop].float()
    g = G[start:stop].float()
    if token_mask is not None:
        g = g * (token_mask[start:stop] != 0).unsqueeze(-1)
    return x, g


def fisher_diag(X: torch.Tensor, G: torch.Tensor, token_mask: torch.Tensor | None = None, *,
                with_sqnorms: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Diagonal empirical Fisher of a linear layer's weight: sum_n (G_n^T X_n)**2.

    X [N,T,I], G [N,T,O] (fp32/bf16/fp16), token_mask [N,T] bool or 0/1 -> [O,I] fp32; with
    `with_sqnorms` also the per-sample squared norms ||G_n^T X_n||^2 [N] fp32, taken from the same
    per-sample gradients.
    """
    N, T, I = X.shape
    O = G.shape[-1]
    fisher = torch.zeros(O, I, dtype=torch.float32, device=X.device)
    sqnorm = torch.empty(N, dtype=torch.float32, device=X.device)
    chunk = _samples_per_chunk(X, G, token_mask, O * I)
    grads = torch.empty(min(chunk, N), O, I, dtype=torch.float32, device=X.device)
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        x, g = _fp32_chunk(X, G, token_mask, start, stop)
        dW = torch.bmm(g.transpose(1, 2), x, out=grads[: stop - start])
        for dW_n in dW:
            fisher.addcmul_(dW_n, dW_n)
        if with_sqnorms:
            flat = dW.flatten(1)
            sqnorm[start:stop] = torch.linalg.vecdot(flat, flat)
    return (fisher, sqnorm) if with_sqnorms else fisher


def lora_fisher_diag(X: torch.Tensor, G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                     token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diagonal Fisher of LoRA factors (y += scaling * B A x) and per-sample squared gradient norms.

    X [N,T,I], G [N,T,O], A [r,I], B [O,r] -> (F_A [r,I], F_B [O,r], sqnorm [N]), all fp32, with
    dA_n = s (G_n B)^T X_n, dB_n = s G_n^T (X_n A^T) and sqnorm_n = ||dA_n||^2 + ||dB_n||^2.
    """
    N, T, I = X.shape
    O = G.shape[-1]
    r = A.shape[0]
    A32, B32 = A.float(), B.float()
    fisher_A = torch.zeros(r, I, dtype=torch.float32, device=X.device)
    fisher_B = torch.zeros(O, r, dtype=torch.float32, device=X.device)
    sqnorm = torch.empty(N, dtype=torch.float32, device=X.device)
    chunk = _samples_per_chunk(X, G, token_mask, 2 * r * (T + I + O))
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        x, g = _fp32_chunk(X, G, token_mask, start, stop)
        dA = torch.bmm(torch.matmul(g, B32).transpose(1, 2), x).mul_(scaling).square_()
        dB = torch.bmm(g.transpose(1, 2), torch.matmul(x, A32.t())).mul_(scaling).square_()
        fisher_A += dA.sum(0)
        fisher_B += dB.sum(0)
        sqnorm[start:stop] = dA.sum((1, 2)) + dB.sum((1, 2))
    return fisher_A, fisher_B, sqnorm


def sqnorm_method(T: int, I: int, O: int) -> str:
    """The cheaper way to get ||G_n^T X_n||^2 by FLOP count: "gram" (two T x T Grams, ~T^2 (I+O))
    or "direct" (the O x I gradient, ~T O I)."""
    return "gram" if T * (I + O) < O * I else "direct"


def sample_sqnorms(X: torch.Tensor, G: torch.Tensor, token_mask: torch.Tensor | None = None,
                   method: str = "auto") -> torch.Tensor:
    """Per-sample squared Frobenius norms ||G_n^T X_n||^2 of a linear layer's weight gradient.

    X [N,T,I], G [N,T,O], token_mask [N,T] -> [N] fp32. method "gram" uses
    ||G_n^T X_n||^2 = sum((X_n X_n^T) * (G_n G_n^T)); "direct" forms G_n^T X_n; "auto" picks the
    cheaper by FLOP count.
    """
    if method not in ("auto", "gram", "direct"):
        raise ValueError(f'method must be "auto", "gram" or "direct", got {method!r}')
    N, T, I = X.shape
    O = G.shape[-1]
    if method == "auto":
        method = sqnorm_method(T, I, O)
    chunk = _samples_per_chunk(X, G, token_mask, 2 * T * T if method == "gram" else O * I)
    sqnorm = torch.empty(N, dtype=torch.float32, device=X.device)
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        x, g = _fp32_chunk(X, G, token_mask, start, stop)
        if method == "gram":
            gram_x = torch.bmm(x, x.transpose(1, 2)).flatten(1)
            sqnorm[start:stop] = torch.linalg.vecdot(gram_x, torch.bmm(g, g.transpose(1, 2)).flatten(1))
        else:
            sqnorm[start:stop] = torch.bmm(g.transpose(1, 2), x).square_().sum((1, 2))
    return sqnorm


# ---- Masked optimizer steps -------------------------------------------------------------


def _masked_view(mask: torch.Tensor, mask_dim: int | None):
    """(dim, index, reshape) such that `reshape(t).index_select(dim, index)` are t's selected entries.

    mask_dim None: element mask of p's shape (entries of p flattened); 0: mask over rows;
    1: mask over columns. Only the selected rows/columns/entries are gathered and scattered,
    so the cost follows the mask's density, not p's size.
    """
    if mask_dim is None:
        return 0, mask.reshape(-1).nonzero().squeeze(1), lambda t: t.view(-1)
    return mask_dim, mask.nonzero().squeeze(1), lambda t: t


def _masked_step_(update, p: torch.Tensor, grad: torch.Tensor, states: tuple[torch.Tensor, ...],
                  mask: torch.Tensor | None, mask_dim: int | None) -> None:
    """Run `update(p32, grad32, *states)` in place on the selected entries only (all when mask is None).

    p is updated in fp32 and rounded back to its dtype; the fp32 states are gathered and scattered
    with it, so unselected entries of p and of every state are never written.
    """
    if mask is None:
        p32 = p if p.dtype == torch.float32 else p.float()
        update(p32, grad.float(), *states)
        if p32 is not p:
            p.copy_(p32)
        return
    dim, index, view = _masked_view(mask, mask_dim)
    if index.numel() == 0:
        return
    p32 = view(p).index_select(dim, index).float()
    picked = [view(state).index_select(dim, index) for state in states]
    update(p32, view(grad).index_select(dim, index).float(), *picked)
    view(p).index_copy_(dim, index, p32.to(p.dtype))
    for state, selected in zip(states, picked):
        view(state).index_copy_(dim, index, selected)


def _adamw_update_(p32: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    # Same operations in the same order as torch.optim.AdamW's single-tensor path.
    if weight_decay != 0:
        p32.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    p32.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def masked_adamw_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  mask: torch.Tensor | None, *, step: int, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-8, weight_decay: float = 0.01, mask_dim: int | None = None) -> None:
    """AdamW step (torch.optim.AdamW semantics) on the entries of p selected by `mask`, in place.

    p, grad: same shape, fp32/bf16/fp16; exp_avg, exp_avg_sq: fp32, p's shape. mask: None (all
    entries), bool/uint8 element mask of p's shape (mask_dim None), or a neuron mask over p's rows
    (mask_dim 0) or columns (mask_dim 1) of a 2-D p. `step` is the shared step count after this
    update (>= 1). Unselected entries of p and both moments are never written.
    """
    beta1, beta2 = betas

    def update(p32: torch.Tensor, grad32: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        _adamw_update_(p32, grad32, m, v, step, lr, beta1, beta2, eps, weight_decay)

    _masked_step_(update, p, grad, (exp_avg, exp_avg_sq), mask, mask_dim)


def _sgd_direction(p32: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, momentum: float,
                   weight_decay: float, nesterov: bool) -> torch.Tensor:
    # Same operations in the same order as torch.optim.SGD (dampening 0). A zero-initialised
    # buffer reproduces torch's first step (buf = grad) exactly: 0 * momentum + grad == grad.
    if weight_decay != 0:
        grad = grad.add(p32, alpha=weight_decay)
    if momentum == 0:
        return grad
    buf.mul_(momentum).add_(grad)
    return grad.add(buf, alpha=momentum) if nesterov else buf


def masked_sgd_(p: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None, *, lr: float,
                momentum: float = 0.0, buf: torch.Tensor | None = None, weight_decay: float = 0.0,
                nesterov: bool = False, mask_dim: int | None = None) -> None:
    """SGD step (torch.optim.SGD semantics, dampening 0) on the entries of p selected by `mask`, in place.

    p, grad: same shape, fp32/bf16/fp16; buf: fp32 momentum buffer of p's shape (zeros before
    the first step), used when momentum > 0. Mask forms as in masked_adamw_. Unselected
    entries of p and buf are never written.
    """
    states = (buf,) if momentum != 0 else ()

    def update(p32: torch.Tensor, grad32: torch.Tensor, *buf32: torch.Tensor) -> None:
        direction = _sgd_direction(p32, grad32, buf32[0] if buf32 else None, momentum, weight_decay, nesterov)
        p32.add_(direction, alpha=-lr)

    _masked_step_(update, p, grad, states, mask, mask_dim)
