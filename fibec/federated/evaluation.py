"""How a run is scored: fixed evaluation shares, the global and the personalised protocol, the baseline.

Two protocols (docs/ALGORITHM.md, Evaluation):
- global: the shared model (the server's state) on the pooled evaluation set;
- personalised: each client's own model (the shared layers and head it receives, plus its own
  other LoRA layers) on its own share, pooled over the clients. For a method without personal
  layers it equals the global figure.
Beside the personalised figure stands its trivial baseline: predict each client's majority
training label on its share. A personalised accuracy near it is label skew, not learning.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import TextClassificationData, make_batches, model_inputs, shortest_first
from ..modeling import set_state
from . import seeds


@dataclass(frozen=True)
class Score:
    """Summed over samples, so that clients' scores add up: correct predictions, loss, count."""

    correct: float = 0.0
    loss_sum: float = 0.0
    count: int = 0

    def __add__(self, other: Score) -> Score:
        return Score(self.correct + other.correct, self.loss_sum + other.loss_sum, self.count + other.count)

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")


@torch.no_grad()
def score(model: torch.nn.Module, data: TextClassificationData | None, tokenizer, *, batch_size: int,
          max_length: int) -> Score:
    """Correct predictions and summed cross-entropy of the model as loaded on all of `data`, in
    batches of similar length, so that little of each forward pass is padding. The sums stay where
    the model runs until the last batch (one read back, not one a batch)."""
    if data is None or len(data) == 0:
        return Score()
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    by_length = shortest_first(data, tokenizer, max_length=max_length)
    for batch in make_batches(data, tokenizer, by_length, batch_size, max_length=max_length):
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if k != "labels"}
        logits = model(**inputs).logits.float()
        labels = batch["labels"].to(device)
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        correct += (logits.argmax(-1) == labels).sum()
    correct, loss_sum = torch.stack([correct.double(), loss_sum]).tolist()
    return Score(correct, loss_sum, len(data))


def _apportion(weights: list[int], total: int) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainder, ties to the first)."""
    w = np.asarray(weights, dtype=np.float64)
    if total <= 0 or w.sum() <= 0:
        return [0] * len(weights)
    quota = w / w.sum() * total
    counts = np.floor(quota).astype(np.int64)
    for k in np.argsort(-(quota - counts), kind="stable")[: total - int(counts.sum())]:
        counts[k] += 1
    return counts.tolist()


def draw_shares(data: TextClassificationData, client_label_counts: list[list[int]], total: int,
                seed: int) -> list[list[int]]:
    """Each client's evaluation share (indices into `data`), drawn once from the seed.

    `total` samples in all (0: all of `data`), split among the clients in proportion to their
    data size and, within a client, to its label counts (largest remainder at both levels); a
    label whose samples run out is topped up from the label with most left. Every engine draws
    the same shares from the same arguments.
    """
    rng = seeds.generator("evaluation shares", seed)
    labels = np.asarray(data.labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in range(data.num_labels)]
    total = len(data) if total <= 0 else min(total, len(data))
    shares = []
    for counts, size in zip(client_label_counts, _apportion([sum(c) for c in client_label_counts], total)):
        picked = []
        for c, count in enumerate(_apportion(counts, size)):
            for _ in range(count):
                pool = pools[c] if pools[c] else max(pools, key=len)
                picked.append(pool.pop())
        shares.append(sorted(picked))
    return shares


def majority_baseline(data: TextClassificationData, shares: list[list[int]],
                      client_label_counts: list[list[int]]) -> float:
    """Accuracy of predicting each client's majority training label on its own share, pooled."""
    labels = np.asarray(data.labels)
    correct = sum(int((labels[share] == int(np.argmax(counts))).sum())
                  for share, counts in zip(shares, client_label_counts) if share)
    count = sum(len(share) for share in shares)
    return correct / count if count else float("nan")


class Evaluator:
    """The fixed evaluation set of a run, split into the clients' shares, and the global protocol."""

    def __init__(self, data: TextClassificationData, client_label_counts: list[list[int]], tokenizer, *,
                 total: int, seed: int, batch_size: int, max_length: int) -> None:
        indices = draw_shares(data, client_label_counts, total, seed)
        self.shares = [data.subset(idx) if idx else None for idx in indices]
        self.pooled = data.subset(sorted(i for idx in indices for i in idx))
        self.majority = majority_baseline(data, indices, client_label_counts)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    def score(self, model: torch.nn.Module, data: TextClassificationData | None) -> Score:
        return score(model, data, self.tokenizer, batch_size=self.batch_size, max_length=self.max_length)

    def global_score(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Score:
        """The shared model (`state` loaded into `model`) on the pooled evaluation set."""
        set_state(model, state)
        return self.score(model, self.pooled)
