"""Drop-in torch.optim optimizers that update only the masked entries or neurons of each parameter.

`MaskedAdamW` and `MaskedSGD` follow torch.optim.AdamW / torch.optim.SGD (dampening 0) exactly
on the entries their masks select and leave every other entry, and its optimizer state,
bit-for-bit unchanged. Masks are swapped between steps with `set_masks`; a parameter without a
mask gets the dense update. Optimizer state is fp32 whatever the parameter dtype.

Masks live in each parameter's state ("mask", "mask_dim": -1 for an element mask, 0 rows,
1 columns), so state_dict()/load_state_dict() carry them with plain tensors and numbers.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any, Callable

import torch

from fibec import ops
from fibec._checks import check_number

_ELEMENT_MASK = -1
# Per-parameter state entries that stay in their saved dtype on load (torch casts floating
# state to the parameter's dtype, which would round fp32 moments of a bf16 parameter).
_KEEP_DTYPE = ("exp_avg", "exp_avg_sq", "momentum_buffer", "mask")

MaskSpec = torch.Tensor | tuple[torch.Tensor, int]


class _MaskedOptimizer(torch.optim.Optimizer):
    """Mask bookkeeping and dtype-preserving state loading shared by MaskedAdamW and MaskedSGD."""

    def set_masks(self, masks: Mapping[torch.Tensor, MaskSpec] | None) -> None:
        """Replace every parameter's mask: {param: mask | (neuron_mask, mask_dim)}; None or {} clears all.

        mask: bool/uint8 element mask of the parameter's shape, or a neuron mask [rows]
        (mask_dim 0) / [cols] (mask_dim 1) of a 2-D parameter. Parameters left out get dense updates.
        """
        masks = {} if masks is None else masks
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping {{param: mask | (mask, mask_dim)}} or None, "
                            f"got {type(masks).__name__}")
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        resolved = {}
        for p, spec in masks.items():
            if not isinstance(p, torch.Tensor) or id(p) not in owned:
                raise ValueError("masks has a key that is not a parameter of this optimizer")
            mask, mask_dim = spec if isinstance(spec, tuple) else (spec, None)
            kind = ops.check_update_mask(p, mask, mask_dim, name="masks[param]")
            resolved[p] = (mask, _ELEMENT_MASK if kind is None else kind)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state.pop("mask", None)
                state.pop("mask_dim", None)
                if p in resolved:
                    state["mask"], state["mask_dim"] = resolved[p]

    def masks(self) -> dict[torch.Tensor, tuple[torch.Tensor, int | None]]:
        """The masks in force: {param: (mask, mask_dim)} with mask_dim None for element masks."""
        return {p: (s["mask"], None if s["mask_dim"] == _ELEMENT_MASK else s["mask_dim"])
                for p, s in self.state.items() if "mask" in s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        kept = {p: {k: saved[i][k] for k in _KEEP_DTYPE if k in saved.get(i, {})} for i, p in zip(saved_ids, params)}
        super().load_state_dict(state_dict)
        for p, entries in kept.items():
            for key, value in entries.items():
                self.state[p][key] = value.to(device=p.device, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, self.state[p])
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        raise NotImplementedError

    @staticmethod
    def _mask_of(state: dict[str, Any]) -> tuple[torch.Tensor | None, int | None]:
        if "mask" not in state:
            return None, None
        return state["mask"], None if state["mask_dim"] == _ELEMENT_MASK else state["mask_dim"]

    @staticmethod
    def _fp32_zeros(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)


class MaskedAdamW(_MaskedOptimizer):
    """torch.optim.AdamW restricted to masked entries/neurons (see fibec.ops.masked_adamw_).

    State per parameter: "step" (int, shared by all entries, counts every step the parameter
    had a gradient), "exp_avg" and "exp_avg_sq" (fp32), and the mask when one is set.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        check_number("lr", lr, low=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            check_number(f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        check_number("eps", eps, low=0.0, low_open=True)
        check_number("weight_decay", weight_decay, low=0.0)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _update(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = self._fp32_zeros(p)
            state["exp_avg_sq"] = self._fp32_zeros(p)
        state["step"] += 1
        mask, mask_dim = self._mask_of(state)
        ops.masked_adamw_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], mask, step=state["step"],
                          lr=group["lr"], betas=group["betas"], eps=group["eps"],
                          weight_decay=group["weight_decay"], mask_dim=mask_dim)


class MaskedSGD(_MaskedOptimizer):
    """torch.optim.SGD (dampening 0) restricted to masked entries/neurons (see fibec.ops.masked_sgd_).

    State per parameter with momentum > 0: "momentum_buffer" (fp32, zeros before the first step,
    which reproduces torch's buf = grad on an entry's first update), and the mask when one is set.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        check_number("lr", lr, low=0.0)
        check_number("momentum", momentum, low=0.0)
        check_number("weight_decay", weight_decay, low=0.0)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True requires momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))

    def _update(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        buf = None
        if group["momentum"] != 0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = self._fp32_zeros(p)
            buf = state["momentum_buffer"]
        mask, mask_dim = self._mask_of(state)
        ops.masked_sgd_(p, p.grad, mask, lr=group["lr"], momentum=group["momentum"], buf=buf,
                        weight_decay=group["weight_decay"], nesterov=group["nesterov"], mask_dim=mask_dim)
