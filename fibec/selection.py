"""What FibecFed updates and sends: neuron importance and masks, global aggregation layers."""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch

from ._checks import check_int, check_number, fraction_count
from .data import model_inputs
from .modeling import AdapterLayout

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
        self.momentum = check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
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


def _top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    # Stable descending sort: among equal scores the lower index ranks first.
    order = torch.sort(score, descending=True, stable=True).indices
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[order[:k]] = True
    return mask


def select_neurons(importance_or_scores: NeuronImportance | dict[str, dict[str, torch.Tensor]], rho: float, *,
                   per_layer: bool = True) -> NeuronMasks:
    """Keep the top-rho fraction of neurons: {layer: {"lora_A": (bool[I], 1), "lora_B": (bool[O], 0)}}.

    scores: {layer: {factor: [n] float}} (NeuronImportance.scores). A factor whose scores are all
    equal (e.g. all zero: no Fisher mass yet) keeps ALL its neurons, in both modes: peft starts
    with B = 0, so A's gradient, and with it A's Fisher, is exactly 0 until B moves; no score can
    tell A's columns apart then, freezing an arbitrary 1 - rho of them would throw away the
    gradient they get once B moves, and a dense factor costs no upload in a layer that stays on
    the device. Every other factor keeps ceil(rho * n) of its n neurons, at least one.
    per_layer=True ranks within each layer's factor; per_layer=False ranks each factor kind (all
    lora_A scores, all lora_B scores of the factors not kept whole) across layers together, keeps
    ceil(rho * total) of them and adds each tensor's best neuron where it got none. Ties go to the
    lower index (for the global ranking: the earlier layer in dict order). The values are
    (neuron_mask, mask_dim) pairs for MaskedAdamW.set_masks.
    """
    scores = importance_or_scores.scores if isinstance(importance_or_scores, NeuronImportance) \
        else importance_or_scores
    if not isinstance(scores, dict):
        raise TypeError(f"importance_or_scores must be a NeuronImportance or a dict of scores, "
                        f"got {type(scores).__name__}")
    rho = check_number("rho", rho, low=0.0, high=1.0, low_open=True)
    masks: NeuronMasks = {}
    ranked = []
    for layer, factors in scores.items():
        for name, score in factors.items():
            dim = _check_factor_name(layer, name)
            if not isinstance(score, torch.Tensor) or score.dim() != 1 or score.numel() == 0:
                raise ValueError(f"scores[{layer!r}][{name!r}] must be a non-empty 1-D tensor")
            if torch.isnan(score).any():
                raise ValueError(f"scores[{layer!r}][{name!r}] contains NaN")
            if bool((score == score[0]).all()):  # nothing to rank by: the factor stays dense (docstring)
                masks.setdefault(layer, {})[name] = (torch.ones_like(score, dtype=torch.bool), dim)
            else:
                ranked.append((layer, name, dim, score))
    if per_layer:
        for layer, name, dim, score in ranked:
            masks.setdefault(layer, {})[name] = (_top_mask(score, fraction_count(rho, score.numel())), dim)
    else:
        for kind in _NEURON_DIM:
            group = [entry for entry in ranked if entry[1] == kind]
            if not group:
                continue
            joined = torch.cat([score.float().to(group[0][3].device) for *_, score in group])
            chosen = _top_mask(joined, fraction_count(rho, joined.numel()))
            for (layer, name, dim, score), mask in zip(group, chosen.split([s.numel() for *_, s in group])):
                mask = mask.to(score.device)
                if not mask.any():
                    mask[torch.sort(score, descending=True, stable=True).indices[0]] = True
                masks.setdefault(layer, {})[name] = (mask, dim)
    return {layer: {name: masks[layer][name] for name in factors} for layer, factors in scores.items() if factors}

# ---- Global aggregation layers (GAL) ranking ---------------------------------------------
# Only the top-L LoRA layers by importance are aggregated by the server and travel over the
# network. Rankers: `layer_sensitivity` (the paper's: how much each layer's output changes
# between two nearby inputs to the model) and the layers' empirical Fisher traces
# (FisherCollector.layer_traces). Formulas: docs/ALGORITHM.md.


def _rms(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Root mean square of t [N, T, F] over the tokens where mask [N, T] is True and all features.

    Over every entry when mask is None or t is not [N, T, .] for the mask's N and T. fp32 scalar.
    """
    sq = t.float().square()
    if mask is None or sq.dim() != 3 or tuple(mask.shape) != tuple(sq.shape[:2]):
        return sq.mean().sqrt()
    keep = mask.to(device=sq.device, dtype=sq.dtype).unsqueeze(-1)
    return ((sq * keep).sum() / (keep.sum() * sq.shape[-1]).clamp_min(1.0)).sqrt()


def layer_sensitivity(model: torch.nn.Module, data_batches: Iterable[dict[str, torch.Tensor]], *,
                      layers: list[str] | None = None, noise_scale: float = 1e-2, num_batches: int | None = 2,
                      seed: int = 0) -> dict[str, float]:
    """The paper's GAL ranker: how much each LoRA layer's output changes when the model's input moves a little.

    Batch b (0-based) runs through the whole model twice, in eval mode under no_grad: as it is,
    and with its input embeddings e [N, T, D] (the output of model.get_input_embeddings())
    replaced by
        e' = e + sigma * rms(e) * eps,   eps ~ N(0, I) [N, T, D] fp32, sigma = noise_scale,
    eps drawn on e's device from a torch.Generator seeded with (seed * 1_000_003 + b) mod 2**63.
    The perturbation reaches a layer through every layer before it, so the score depends on the
    data and on all the LoRA weights upstream. With y_l the full output of LoRA layer l
    (W x + b + s B A x) on the clean pass and y'_l on the perturbed pass,
        S_l(b) = rms(y'_l - y_l) / rms(y_l),
    rms over the valid tokens (the batch's attention_mask; every position when the batch has
    none or the tensor is not [N, T, .]) and the features. S_l is the mean of S_l(b) over the
    first num_batches batches (None: all).

    data_batches: dicts from fibec.data.make_batches ("index" is dropped before the forward).
    layers: names (model.named_modules()) of the peft LoRA layers to rank, each running once
    per forward; default every LoRA layer. Returns {layer: S_l} in the order of `layers`. The
    train/eval mode of every module is restored and the hooks removed, also on error.
    """
    sigma = check_number("noise_scale", noise_scale, low=0.0, low_open=True)
    if num_batches is not None:
        check_int("num_batches", num_batches, low=1)
    seed = check_int("seed", seed)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, torch.nn.Module):
        raise TypeError("model must have get_input_embeddings() returning its input embedding module")
    lora_layers = AdapterLayout.of(model).layers
    names = lora_layers if layers is None else list(dict.fromkeys(layers))
    if not names:
        raise ValueError("layers: no LoRA layer to rank")
    not_lora = [n for n in names if n not in lora_layers]
    if not_lora:
        raise ValueError(f"layers: {not_lora[0]!r} is not a peft LoRA layer of the model")
    modules = dict(model.named_modules())

    # One batch's state, shared by the hooks. A clean output is copied because the model may
    # change it in place after the hook; it is dropped as soon as its perturbed twin arrives.
    run = {"perturbed": False, "mask": None, "batch": 0, "embedded": False}
    clean: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    totals: dict[str, torch.Tensor | float] = dict.fromkeys(names, 0.0)

    def perturb_embeddings(module, args, output):
        if not run["perturbed"]:
            return None
        run["embedded"] = True
        generator = torch.Generator(device=output.device).manual_seed((seed * 1_000_003 + run["batch"]) % 2**63)
        eps = torch.randn(output.shape, generator=generator, device=output.device, dtype=torch.float32)
        return (output.float() + sigma * _rms(output, run["mask"]) * eps).to(output.dtype)

    def compare_outputs(name: str):
        def hook(module, args, output):
            # Stored on the clean pass, consumed on the perturbed one: any other order means a
            # second call within one forward.
            if (name in clean) != run["perturbed"]:
                raise ValueError(f"layers: {name!r} runs more than once per forward; "
                                 "layer_sensitivity ranks layers that run once")
            if not run["perturbed"]:
                scale = _rms(output, run["mask"])
                if scale == 0:
                    raise ValueError(f"layer {name!r} outputs zeros on the valid tokens of batch {run['batch']}: "
                                     "its relative change is undefined")
                clean[name] = (output.detach().clone(), scale)
                return
            reference, scale = clean.pop(name)
            totals[name] = totals[name] + _rms(output.float() - reference.float(), run["mask"]) / scale
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [embeddings.register_forward_hook(perturb_embeddings)]
    handles += [modules[n].register_forward_hook(compare_outputs(n)) for n in names]
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in itertools.islice(data_batches, num_batches):
                mask = batch.get("attention_mask")
                run["mask"] = None if mask is None else mask.to(device).bool()
                inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
                run["perturbed"] = False
                model(**inputs)
                missing = [n for n in names if n not in clean]
                if missing:
                    raise ValueError(f"layers: {missing[0]!r} did not run in the model's forward")
                run["perturbed"], run["embedded"] = True, False
                model(**inputs)
                if not run["embedded"]:
                    raise ValueError("model: its input embeddings (model.get_input_embeddings()) did not run "
                                     "in the forward, so the input could not be perturbed")
                run["batch"] += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    if run["batch"] == 0:
        raise ValueError("data_batches yielded no batch")
    return {n: float(totals[n]) / run["batch"] for n in names}


def combine_layer_scores(client_scores: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """Server side: combine the clients' layer scores, each normalised to sum 1, by a weighted mean.

    Each client's scores are first divided by their sum, so that every client ranks with a vote of
    total weight w_k: raw scores differ in scale between clients (a Fisher sum grows with the number
    of scored samples and with how unconverged a client is; sensitivities with the input scale of
    its data), and without normalising one client would decide the GAL alone. Then
        S_l = sum_k w_k * S_k,l / sum_j S_k,j  /  sum_k w_k   (over clients with sum_j S_k,j > 0).
    All clients must score the same layers; scores must be finite and >= 0; weights (e.g. sample
    counts) finite, >= 0, with positive sum. A client whose scores are all zero abstains; if all
    abstain every layer gets 0.
    """
    if not isinstance(client_scores, (list, tuple)) or not client_scores:
        raise ValueError("client_scores must be a non-empty list of {layer: score} dicts")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(client_scores):
        raise ValueError(f"weights must be a list with one weight per client ({len(client_scores)})")
    w = []
    for k, value in enumerate(weights):
        w.append(check_number(f"weights[{k}]", value, low=0.0))
    if sum(w) <= 0:
        raise ValueError("weights must have a positive sum")
    names = list(client_scores[0])
    for k, scores in enumerate(client_scores):
        if set(scores) != set(names):
            raise ValueError(f"client_scores[{k}] scores layers {sorted(set(scores) ^ set(names))[:3]} "
                             f"differently from client_scores[0]")
        for layer, value in scores.items():
            if not math.isfinite(float(value)) or float(value) < 0:
                raise ValueError(f"client_scores[{k}][{layer!r}] must be finite and >= 0, got {value!r}")
    combined = dict.fromkeys(names, 0.0)
    voting_weight = 0.0
    for wk, scores in zip(w, client_scores):
        total = math.fsum(float(v) for v in scores.values())
        if total <= 0 or wk == 0:
            continue
        voting_weight += wk
        for layer in names:
            combined[layer] += wk * float(scores[layer]) / total
    if voting_weight > 0:
        combined = {layer: value / voting_weight for layer, value in combined.items()}
    return combined


def select_gal(scores: dict[str, float], size: int | float) -> list[str]:
    """The top-L layers by score, best first; ties go to the lexicographically smaller name.

    size: an int L in [1, n_layers], or a float fraction f in (0, 1] giving L = ceil(f * n_layers).
    """
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores must be a non-empty {layer: score} dict")
    n = len(scores)
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"size must be an int count or a float fraction, got {size!r}")
    if isinstance(size, int):
        if not 1 <= size <= n:
            raise ValueError(f"size must be between 1 and the number of layers ({n}), got {size}")
        count = size
    else:
        if not (math.isfinite(size) and 0.0 < size <= 1.0):
            raise ValueError(f"size as a fraction must be in (0, 1], got {size}")
        count = fraction_count(size, n)
    for layer, value in scores.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"scores[{layer!r}] must be finite, got {value!r}")
    return sorted(scores, key=lambda layer: (-float(scores[layer]), layer))[:count]
