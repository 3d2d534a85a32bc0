"""What FibecFed updates and sends: neuron importance and masks, global aggregation layers."""
from __future__ import annotations

import math

import torch

# ---- Neuron importance and masks (sparse local update) -----------------------------------
# A LoRA layer's neurons: the input neurons are the columns of lora_A [r, I] (mask_dim 1), the
# output neurons the rows of lora_B [O, r] (mask_dim 0); a dense layer's "weight" [O, I] is scored
# by its output neurons (rows). A neuron's score is its diagonal Fisher summed over the other axis.
_NEURON_DIM = {"lora_A": 1, "lora_B": 0, "weight": 0}

NeuronMasks = dict[str, dict[str, tuple[torch.Tensor, int]]]


def _check_factor_name(layer: str, name: str) -> int:
    if name not in _NEURON_DIM:
        raise ValueError(f"fisher[{layer!r}] has key {name!r}; expected one of {sorted(_NEURON_DIM)}")
    return _NEURON_DIM[name]


class NeuronImportance:
    """Momentum-smoothed diagonal Fisher per layer and factor: F_t = g * F_{t-1} + (1 - g) * F_new.

    The first update of a layer's factor sets F_1 = F_new (no decay toward zero, so early scores are
    not biased small); a factor seen for the first time later starts the same way. Fed with
    FisherCollector.fisher: {layer_name: {"lora_A": F_A [r, I], "lora_B": F_B [O, r]}} (any float
    dtype; kept in fp32). `scores` sums F per neuron: {"lora_A": F_A.sum(0) [I] (input neurons),
    "lora_B": F_B.sum(1) [O] (output neurons)}.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.fisher: dict[str, dict[str, torch.Tensor]] = {}

    def update(self, fisher: dict[str, dict[str, torch.Tensor]]) -> None:
        """Fold one round's Fisher {layer: {factor: Tensor}} into the running averages."""
        if not isinstance(fisher, dict):
            raise TypeError(f"fisher must be a dict {{layer: {{factor: Tensor}}}}, got {type(fisher).__name__}")
        checked = []
        for layer, factors in fisher.items():
            if not isinstance(factors, dict):
                raise TypeError(f"fisher[{layer!r}] must be a dict {{factor: Tensor}}, got {type(factors).__name__}")
            for name, value in factors.items():
                _check_factor_name(layer, name)
                if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
                    raise ValueError(f"fisher[{layer!r}][{name!r}] must be a 2-D float tensor")
                previous = self.fisher.get(layer, {}).get(name)
                if previous is not None and previous.shape != value.shape:
                    raise ValueError(f"fisher[{layer!r}][{name!r}] has shape {tuple(value.shape)}, "
                                     f"earlier updates had {tuple(previous.shape)}")
                checked.append((layer, name, value.detach()))
        for layer, name, value in checked:
            stored = self.fisher.setdefault(layer, {})
            if name in stored:
                stored[name].mul_(self.momentum).add_(value.to(stored[name]), alpha=1.0 - self.momentum)
            else:
                stored[name] = value.to(torch.float32, copy=True)

    @property
    def scores(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-neuron importance {layer: {"lora_A": [I], "lora_B": [O]}}, fp32."""
        return {layer: {name: F.sum(dim=1 - _NEURON_DIM[name]) for name, F in factors.items()}
                for layer, factors in self.fisher.items()}

    def state_dict(self) -> dict:
        return {"momentum": self.momentum,
                "fisher": {layer: {name: F.clone() for name, F in factors.items()}
                           for layer, factors in self.fisher.items()}}

    def load_state_dict(self, state: dict) -> None:
        fisher = state["fisher"]
        for layer, factors in fisher.items():
            for name, F in factors.items():
                _check_factor_name(layer, name)
                if not isinstance(F, torch.Tensor) or F.dim() != 2:
                    raise ValueError(f"state['fisher'][{layer!r}][{name!r}] must be a 2-D tensor")
        self.momentum = NeuronImportance(state["momentum"]).momentum
        self.fisher = {layer: {name: F.to(torch.float32, copy=True) for name, F in factors.items()}
                       for layer, factors in fisher.items()}


def _top_count(rho: float, n: int) -> int:
    # ceil(rho * n), with float noise (0.1 * 30 = 3.0000000000000004) rounded away first.
    return min(n, max(1, math.ceil(round(rho * n, 6))))


def _top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    # Stable descending sort: among equal scores the lower index ranks first.
    order = torch.sort(score, descending=True, stable=True).indices
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[order[:k]] = True
    return mask


def select_neurons(importance_or_scores: NeuronImportance | dict[str, dict[str, torch.Tensor]], rho: float, *,
                   per_layer: bool = True) -> NeuronMasks:
    """Keep the top-rho fraction of neurons: {layer: {"lora_A": (bool[I], 1), "lora_B": (bool[O], 0)}}.

    Each tensor keeps ceil(rho * n) of its n neurons, at least one. per_layer=True ranks within
    each layer's factor; per_layer=False ranks each factor kind (all lora_A scores, all lora_B
    scores) across layers together, keeps ceil(rho * total) of them and adds each tensor's best
    neuron where it got none. Ties go to the lower index (for the global ranking: the earlier
    layer in dict order). The values are (neuron_mask, mask_dim) pairs for MaskedAdamW.set_masks.
    """
    scores = importance_or_scores.scores if isinstance(importance_or_scores, NeuronImportance) \
        else importance_or_scores
    if not isinstance(scores, dict):
        raise TypeError(f"importance_or_scores must be a NeuronImportance or a dict of scores, "
                        f"got {type(scores).__name__}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be a number in (0, 1], got {rho!r}")
    flat = []
    for layer, factors in scores.items():
        for name, score in factors.items():
            dim = _check_factor_name(layer, name)
            if not isinstance(score, torch.Tensor) or score.dim() != 1 or score.numel() == 0:
                raise ValueError(f"scores[{layer!r}][{name!r}] must be a non-empty 1-D tensor")
            if torch.isnan(score).any():
                raise ValueError(f"scores[{layer!r}][{name!r}] contains NaN")
            flat.append((layer, name, dim, score))
    masks: NeuronMasks = {}
    if per_layer:
        for layer, name, dim, score in flat:
            masks.setdefault(layer, {})[name] = (_top_mask(score, _top_count(rho, score.numel())), dim)
        return masks
    for kind in _NEURON_DIM:
        group = [entry for entry in flat if entry[1] == kind]
        if not group:
            continue
        joined = torch.cat([score.float().to(group[0][3].device) for *_, score in group])
        chosen = _top_mask(joined, _top_count(rho, joined.numel()))
        for (layer, name, dim, score), mask in zip(group, chosen.split([s.numel() for *_, s in group])):
            mask = mask.to(score.device)
            if not mask.any():
                mask[torch.sort(score, descending=True, stable=True).indices[0]] = True
            masks.setdefault(layer, {})[name] = (mask, dim)
    return {layer: masks[layer] for layer in scores if layer in masks}

# ---- Global aggregation layers (GAL) ranking ---------------------------------------------
