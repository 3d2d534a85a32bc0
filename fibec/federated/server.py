"""The FibecFed server: global LoRA state, GAL selection, checked sample-weighted aggregation.

Engine-neutral: it turns its state into payload bytes and folds clients' update bytes back in.
The classification head travels and is aggregated (dense) in every method; of the LoRA layers
only the sent ones (the GAL, or all layers in fedavg / no-gal) are aggregated.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from .. import codec
from ..modeling import AdapterLayout
from ..selection import combine_layer_scores, select_gal
from .client import LAYER_SCORES, ClientUpdate, RoundPlan

log = logging.getLogger("fibec.server")


@dataclass
class AggregateResult:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)


class Server:
    """Holds the global trainable state and decides what travels each round.

    gal_size: number L of global aggregation layers (1..number of LoRA layers).
    aggregate_all: send and aggregate every LoRA layer (fedavg, no-gal) instead of the GAL.
    dense_all: every layer trains densely (fedavg, no-sparse) instead of only the GAL.
    reselect_every: re-rank and re-select the GAL every k rounds (0: keep the first selection).
    """

    def __init__(self, layout: AdapterLayout, initial_state: dict[str, torch.Tensor], *, gal_size: int,
                 aggregate_all: bool, dense_all: bool, reselect_every: int = 0, values: str = "fp32") -> None:
        n_layers = len(layout.layers)
        if isinstance(gal_size, bool) or not isinstance(gal_size, int) or not 1 <= gal_size <= n_layers:
            raise ValueError(f"gal_size must be an int in [1, {n_layers}] (the number of LoRA layers), "
                             f"got {gal_size!r}")
        self.layout = layout
        self.state = {n: initial_state[n].detach().to(torch.float32).clone() for n in layout.all_names}
        self.gal_size = gal_size
        self.aggregate_all = aggregate_all
        self.dense_all = dense_all
        self.reselect_every = reselect_every
        self.values = values
        # Ranking matters only when the GAL decides what travels or what trains densely.
        self.needs_ranking = gal_size < n_layers and not (aggregate_all and dense_all)
        self.gal: tuple[str, ...] = () if self.needs_ranking else tuple(layout.layers)
        self.layer_scores: dict[str, float] = {}

    # ---- GAL -----------------------------------------------------------------------------------

    def _read_scores(self, payload: bytes) -> dict[str, float]:
        tensors = codec.decode(payload)
        vector = tensors.get(LAYER_SCORES)
        if set(tensors) != {LAYER_SCORES} or vector is None or tuple(vector.shape) != (len(self.layout.layers),):
            raise codec.PayloadError(f"layer scores must be one tensor {LAYER_SCORES!r} of shape "
                                     f"({len(self.layout.layers)},)")
        if not torch.isfinite(vector).all():
            raise codec.PayloadError("layer scores are not all finite")
        return dict(zip(self.layout.layers, vector.tolist()))

    def select(self, score_payloads: list[tuple[int, bytes, float]]) -> tuple[str, ...]:
        """Rank layers from clients' (cid, scores bytes, weight) and keep the top gal_size as the GAL.

        A client whose scores do not decode is skipped with a logged reason; with no usable scores
        the GAL stays as it was (the first L layers when there was none).
        """
        scores, weights = [], []
        for cid, payload, weight in score_payloads:
            try:
                scores.append(self._read_scores(payload))
                weights.append(weight)
            except codec.PayloadError as err:
                log.warning("client %s: layer scores rejected: %s", cid, err)
        if scores:
            self.layer_scores = combine_layer_scores(scores, weights)
            chosen = set(select_gal(self.layer_scores, self.gal_size))
            self.gal = tuple(l for l in self.layout.layers if l in chosen)
        elif not self.gal:
            self.gal = tuple(self.layout.layers[: self.gal_size])
        return self.gal

    # ---- rounds --------------------------------------------------------------------------------

    def plan(self, round_idx: int) -> RoundPlan:
        if self.needs_ranking and not self.gal:
            raise RuntimeError("the GAL is not selected yet: call select() with the clients' initial scores")
        everything = tuple(self.layout.layers)
        want = self.needs_ranking and self.reselect_every > 0 and (round_idx + 1) % self.reselect_every == 0
        return RoundPlan(round_idx, everything if self.aggregate_all else self.gal,
                         everything if self.dense_all else self.gal, want)

    def sent_names(self, plan: RoundPlan) -> list[str]:
        return self.layout.param_names(plan.sent) + list(self.layout.head)

    def payload(self, plan: RoundPlan) -> bytes:
        """The weights the clients load this round: the sent LoRA layers and the head."""
        return codec.encode({n: self.state[n] for n in self.sent_names(plan)}, values=self.values)

    def _check(self, plan: RoundPlan, update: ClientUpdate) -> dict[str, torch.Tensor]:
        delta = codec.decode(update.payload)
        expected = self.sent_names(plan)
        if set(delta) != set(expected):
            missing = sorted(set(expected) - set(delta))
            extra = sorted(set(delta) - set(expected))
            raise codec.PayloadError(f"tensor names differ from the plan (missing {missing[:3]}, "
                                     f"unexpected {extra[:3]})")
        for name in expected:
            if tuple(delta[name].shape) != tuple(self.state[name].shape):
                raise codec.PayloadError(f"{name} has shape {tuple(delta[name].shape)}, "
                                         f"expected {tuple(self.state[name].shape)}")
            if not delta[name].is_floating_point() or not torch.isfinite(delta[name]).all():
                raise codec.PayloadError(f"{name} is not a finite float tensor")
        if not (isinstance(update.num_samples, int) and update.num_samples > 0):
            raise codec.PayloadError(f"num_samples must be a positive int, got {update.num_samples!r}")
        return delta

    def aggregate(self, plan: RoundPlan, updates: list[ClientUpdate]) -> AggregateResult:
        """Check every update, then add the sample-weighted mean delta to the sent layers and head.

        An update that fails to decode or does not match the plan (names, shapes, finiteness) is
        rejected with a logged reason; the others are aggregated. When the plan asked for layer
        scores, the GAL is re-selected from the accepted clients' scores for the next round.
        """
        result = AggregateResult()
        deltas, weights, scores = [], [], []
        for update in updates:
            try:
                delta = self._check(plan, update)
            except codec.PayloadError as err:
                log.warning("client %s: update rejected: %s", update.cid, err)
                result.rejected[update.cid] = str(err)
                continue
            result.accepted.append(update.cid)
            deltas.append(delta)
            weights.append(float(update.num_samples))
            if plan.want_scores and update.scores:
                scores.append((update.cid, update.scores, float(update.num_samples)))
        if deltas:
            total = math.fsum(weights)
            for name in self.sent_names(plan):
                mean = sum(d[name].to(torch.float32) * (w / total) for d, w in zip(deltas, weights))
                self.state[name] += mean
        if plan.want_scores and scores:
            self.select(scores)
        return result
