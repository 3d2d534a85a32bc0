"""FibecFed's adaptive curriculum: Fisher difficulty scores, pacing functions, the curriculum sampler.

A sample's difficulty is the trace of its empirical Fisher over the trainable LoRA parameters,
i.e. the squared norm of its per-sample loss gradient. In round t a client trains only on its
easiest ceil(lambda(t) * n) samples; lambda grows from lambda0 to 1 by a pacing function.
Formulas and defaults: docs/ALGORITHM.md.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from ._checks import check_int, check_number, fraction_count
from .config import PACING_KINDS
from .data import model_inputs
from .fisher import FisherCollector

__all__ = ["PACING_KINDS", "pacing_fraction", "difficulty_scores", "DifficultyTracker", "within_label_rank",
           "CurriculumSampler"]


def pacing_fraction(kind: str, round_idx: int, *, lambda0: float, full_at: int, steps: int = 4) -> float:
    """Fraction lambda(t) of a client's data (easiest first) used in round t = round_idx (0-based).

    With l0 = lambda0, T = full_at and u = t / T, for t < T:
      linear     l0 + (1 - l0) * u
      root       sqrt(l0**2 + (1 - l0**2) * u)
      geometric  l0 ** (1 - u)                      (multiplies by l0**(-1/T) each round)
      step       l0 + (1 - l0) * floor(steps * u) / steps
    and 1 for t >= T. All are non-decreasing, equal l0 at t = 0 and reach 1 exactly at t = T.
    """
    if kind not in PACING_KINDS:
        raise ValueError(f"kind: unknown pacing {kind!r}; known: {', '.join(PACING_KINDS)}")
    t = check_int("round_idx", round_idx, low=0)
    l0 = check_number("lambda0", lambda0, low=0.0, high=1.0, low_open=True)
    big_t = check_int("full_at", full_at, low=1)
    n_steps = check_int("steps", steps, low=1)
    if t >= big_t:
        return 1.0
    u = t / big_t
    if kind == "linear":
        value = l0 + (1.0 - l0) * u
    elif kind == "root":
        value = math.sqrt(l0 * l0 + (1.0 - l0 * l0) * u)
    elif kind == "geometric":
        value = l0 ** (1.0 - u)
    else:
        value = l0 + (1.0 - l0) * ((n_steps * t) // big_t) / n_steps
    return min(1.0, value)


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    return int(batch["index"].shape[0])


def difficulty_scores(model: torch.nn.Module, data_batches: Iterable[Mapping[str, torch.Tensor]], *,
                      num_samples: int | None = None, return_fisher: bool = False,
                      loss_fn: Callable[[object, Mapping[str, torch.Tensor]], torch.Tensor] | None = None):
    """Per-sample difficulty: trace of the sample's empirical Fisher over the LoRA parameters.

    score_n = sum over LoRA layers l of ||d loss_n / d A_l||^2 + ||d loss_n / d B_l||^2, where loss_n
    is sample n's own loss (HF's mean loss is rescaled per sample by FisherCollector with
    loss_reduction="mean"). One forward + backward per batch, in eval mode (dropout off), no
    optimizer step; padding tokens are masked out via the batch's attention_mask.

    data_batches: dicts from `fibec.data.make_batches` (input_ids, attention_mask, labels, index,
    ...); the model is called with everything but "index". Scores land at batch["index"].
    num_samples: length of the returned vector (default: 1 + the largest index seen); positions
    no batch covered stay NaN so a forgotten sample can never pass for an easy one.
    loss_fn(model_output, batch) -> the batch-mean loss to score with (default: the model's own loss).

    Returns scores, a float32 CPU tensor [num_samples]; with return_fisher=True returns
    (scores, fisher, layer_traces): FisherCollector's `fisher` ({layer: {"lora_A": [r,I],
    "lora_B": [O,r]}}, fp32 sums over all scored samples) and `layer_traces` ({layer: float}).
    The model's train/eval mode and every parameter's .grad are restored afterwards.
    """
    was_training = model.training
    saved_grads = {p: p.grad for p in model.parameters()}
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.enable_grad(), FisherCollector(model, "lora", loss_reduction="mean") as fc:
            for batch in data_batches:
                for p in saved_grads:
                    p.grad = None
                fc.token_mask = batch.get("attention_mask")
                inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
                out = model(**inputs)
                loss = out.loss if loss_fn is None else loss_fn(out, batch)
                if loss is None:
                    raise ValueError("data_batches: the model returned no loss (batches need 'labels')")
                loss.backward()
                sample = fc.sample_scores.detach()
                if sample.shape[0] != _batch_size(batch):
                    raise RuntimeError(f"FisherCollector gave {sample.shape[0]} scores for a batch of "
                                       f"{_batch_size(batch)}")
                chunks.append((batch["index"].cpu(), sample))  # read back once, after the last batch
            fisher = {name: {k: v.detach().clone() for k, v in parts.items()} for name, parts in fc.fisher.items()}
            traces = dict(fc.layer_traces)
    finally:
        for p, g in saved_grads.items():
            p.grad = g
        model.train(was_training)
    if not chunks:
        raise ValueError("data_batches yielded no batch")
    size = num_samples if num_samples is not None else 1 + max(int(i.max()) for i, _ in chunks)
    scores = torch.full((size,), float("nan"), dtype=torch.float32)
    for idx, sample in scores_on_host(chunks):
        scores[idx] = sample
    return (scores, fisher, traces) if return_fisher else scores


def scores_on_host(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(indices [n_i], per-sample scores [n_i])] with every chunk's scores read back to the host in
    one read: each read of a device tensor is a wait for the device, so batches keep their scores
    where they were computed and hand them over here, once. Returns the same pairs in order, the
    scores as float32 CPU tensors."""
    if not chunks:
        return []
    arrived = torch.cat([scores for _, scores in chunks]).float().cpu()
    return list(zip([index for index, _ in chunks], arrived.split([scores.shape[0] for _, scores in chunks])))


class CurriculumSampler:
    """Round-wise batches from the easiest part of a client's data.

    Round t uses the pool of the m = ceil(lambda(t) * n) lowest-scored samples (ascending score,
    ties by lower index first; NaN scores count as hardest). The pool is shuffled with a numpy
    generator seeded by (seed, t) and cut into batches of batch_size (the last batch of a pass
    may be smaller); when more batches are asked for than one pass gives, further passes follow,
    each reshuffled. Indices are positions 0..n-1 in `scores`.

    lambda0 and full_at (see `pacing_fraction`) have no default: the round where all data is used
    depends on how many rounds the run has (the driver's are FedConfig's).
    """

    def __init__(self, scores: torch.Tensor | np.ndarray, *, batch_size: int, lambda0: float, full_at: int,
                 pacing: str = "linear", steps: int = 4, seed: int = 0) -> None:
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.pacing, self.lambda0, self.full_at, self.steps = pacing, lambda0, full_at, steps
        pacing_fraction(pacing, 0, lambda0=lambda0, full_at=full_at, steps=steps)  # validates the schedule
        self.seed = int(seed)
        self._order = np.empty(0, dtype=np.int64)
        self.update_scores(scores)

    def update_scores(self, scores: torch.Tensor | np.ndarray) -> None:
        """Replace the difficulty scores (re-scoring every k rounds); the length must not change."""
        values = (scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor)
                  else np.asarray(scores, dtype=np.float64)).reshape(-1)
        if values.size == 0:
            raise ValueError("scores must not be empty")
        if self._order.size and values.size != self._order.size:
            raise ValueError(f"scores has {values.size} entries, the sampler was built for {self._order.size}")
        values = np.where(np.isnan(values), np.inf, values)
        self._order = np.argsort(values, kind="stable")

    def __len__(self) -> int:
        return int(self._order.size)

    def state_dict(self) -> dict:
        """The order (easiest first) and the schedule; tensors and plain values."""
        return {"order": torch.from_numpy(self._order.copy()), "batch_size": self.batch_size, "pacing": self.pacing,
                "lambda0": self.lambda0, "full_at": self.full_at, "steps": self.steps, "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a `state_dict()`; ValueError when its order is not a permutation of this sampler's samples."""
        order = np.asarray(state["order"], dtype=np.int64).reshape(-1)
        if order.size != len(self) or not np.array_equal(np.sort(order), np.arange(len(self))):
            raise ValueError(f"state['order'] must be a permutation of range({len(self)})")
        pacing_fraction(state["pacing"], 0, lambda0=state["lambda0"], full_at=state["full_at"], steps=state["steps"])
        self.batch_size = check_int("batch_size", state["batch_size"], low=1)
        self.pacing, self.lambda0 = state["pacing"], float(state["lambda0"])
        self.full_at, self.steps, self.seed = int(state["full_at"]), int(state["steps"]), int(state["seed"])
        self._order = order

    def fraction(self, round_idx: int) -> float:
        return pacing_fraction(self.pacing, round_idx, lambda0=self.lambda0, full_at=self.full_at, steps=self.steps)

    def pool(self, round_idx: int) -> list[int]:
        """The indices of round round_idx's pool, easiest first."""
        return self._order[:fraction_count(self.fraction(round_idx), len(self))].tolist()

    def batches(self, round_idx: int, num_batches: int) -> list[list[int]]:
        """num_batches index lists for round round_idx, all drawn from its pool."""
        wanted = check_int("num_batches", num_batches, low=0)
        pool = np.asarray(self.pool(round_idx), dtype=np.int64)
        rng = np.random.default_rng([self.seed, int(round_idx)])
        out: list[list[int]] = []
        while len(out) < wanted:
            order = rng.permutation(pool)
            for start in range(0, len(order), self.batch_size):
                if len(out) == wanted:
                    break
                out.append(order[start:start + self.batch_size].tolist())
        return out


def within_label_rank(scores: torch.Tensor | np.ndarray, labels: list[int] | np.ndarray) -> np.ndarray:
    """Each score replaced by its rank fraction among the samples of the same label: (rank + 0.5) / n_c.

    scores [n] (any float), labels [n] ints; returns float64 [n] in (0, 1). Sorting by it interleaves
    the labels, so the easiest fraction of the data holds that fraction of every label. Without it,
    Fisher scores on a fresh model rank by label (the untrained head already favours one class,
    whose samples then have small gradients) and the first curriculum rounds would see mostly one
    label. Ties keep the lower index first.
    """
    values = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    y = np.asarray(labels)
    if values.shape != y.shape or values.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of the same length, got {values.shape} and {y.shape}")
    ranked = np.empty_like(values)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        order = np.argsort(values[members], kind="stable")
        ranked[members[order]] = (np.arange(members.size) + 0.5) / members.size
    return ranked


class DifficultyTracker:
    """Each sample's latest Fisher difficulty, and an estimate for the samples not scored yet.

    The adaptive curriculum re-scores samples as it trains on them: the per-sample Fisher traces of
    a training batch (FisherCollector.sample_scores) are `observe`d for the batch's samples, so the
    order follows the model at almost no cost. Samples never trained on yet have no score; their
    estimate comes from a prior, their length in tokens, mapped onto the scores seen so far by
    quantiles within their group (label when `groups` is given): an unseen sample whose length is at
    quantile q of the scored samples' lengths gets the q-quantile of their scores. Before any sample
    of a group is scored, its samples are ordered by length alone (shorter first: the classic
    curriculum prior; on a fresh model the Fisher trace mostly follows length, docs/ALGORITHM.md 1.4).

    lengths [n]: token counts (> 0); groups [n]: ints or None (one group).
    """

    def __init__(self, lengths: np.ndarray | list[int], groups: np.ndarray | list[int] | None = None) -> None:
        self.lengths = np.asarray(lengths, dtype=np.float64).reshape(-1)
        if self.lengths.size == 0 or not np.all(np.isfinite(self.lengths)):
            raise ValueError("lengths must be a non-empty vector of finite token counts")
        self.groups = (np.zeros(self.lengths.size, dtype=np.int64) if groups is None
                       else np.asarray(groups, dtype=np.int64).reshape(-1))
        if self.groups.shape != self.lengths.shape:
            raise ValueError(f"groups has {self.groups.size} entries, lengths {self.lengths.size}")
        self.scores = np.full(self.lengths.size, np.nan)

    def __len__(self) -> int:
        return int(self.lengths.size)

    def observe(self, indices: torch.Tensor | np.ndarray | list[int], scores: torch.Tensor | np.ndarray) -> None:
        """Record fresh scores [k] of the samples at `indices` [k]; non-finite scores are ignored."""
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
        values = np.asarray(scores.detach().float().cpu() if isinstance(scores, torch.Tensor) else scores,
                            dtype=np.float64).reshape(-1)
        if idx.shape != values.shape:
            raise ValueError(f"indices has {idx.size} entries, scores {values.size}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"indices must lie in range({len(self)})")
        keep = np.isfinite(values)
        self.scores[idx[keep]] = values[keep]

    @property
    def scored(self) -> np.ndarray:
        """bool [n]: which samples have a measured score."""
        return ~np.isnan(self.scores)

    def ranking(self) -> np.ndarray:
        """float64 [n]: 0..n-1, the position of each sample when sorted easiest first.

        Measured scores where there are, quantile-mapped length estimates elsewhere; equal
        estimates are ordered by length, then index.
        """
        estimate = self.scores.copy()
        for group in np.unique(self.groups):
            members = self.groups == group
            seen = members & self.scored
            unseen = members & ~self.scored
            if not unseen.any():
                continue
            if not seen.any():
                estimate[unseen] = self.lengths[unseen]
                continue
            seen_lengths = np.sort(self.lengths[seen])
            below = np.searchsorted(seen_lengths, self.lengths[unseen], side="left")
            at_or_below = np.searchsorted(seen_lengths, self.lengths[unseen], side="right")
            quantile = (below + at_or_below) / (2.0 * seen_lengths.size)
            estimate[unseen] = np.quantile(self.scores[seen], quantile)
        order = np.lexsort((np.arange(len(self)), self.lengths, estimate))
        ranking = np.empty(len(self), dtype=np.float64)
        ranking[order] = np.arange(len(self))
        return ranking

    def state_dict(self) -> dict:
        return {"lengths": torch.from_numpy(self.lengths.copy()), "groups": torch.from_numpy(self.groups.copy()),
                "scores": torch.from_numpy(self.scores.copy())}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        lengths, groups, scores = (np.asarray(state[k], dtype=d) for k, d in
                                   (("lengths", np.float64), ("groups", np.int64), ("scores", np.float64)))
        if not lengths.shape == groups.shape == scores.shape:
            raise ValueError("DifficultyTracker state: lengths, groups and scores differ in length")
        self.lengths, self.groups, self.scores = lengths, groups, scores
