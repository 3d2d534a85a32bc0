"""The FibecFed server: global LoRA state, GAL selection, checked sample-weighted aggregation.

Engine-neutral: it turns its state into payload bytes and folds clients' update bytes back in.
The classification head travels and is aggregated (dense) in every method; of the LoRA layers
only the sent ones (the GAL, or all layers in fedavg / no-gal) are aggregated. A layer that enters
the GAL at a re-selection starts from the clients' own trained values, never from the server's
stale copy (docs/ALGORITHM.md, 2.2).
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field

import torch

from .. import codec
from ..config import FedConfig
from ..modeling import AdapterLayout
from ..selection import combine_layer_scores, select_gal
from .client import LAYER_SCORES, ClientUpdate, RoundPlan
from .methods import Method

log = logging.getLogger("fibec.server")


@dataclass
class AggregateResult:
    """What `Server.aggregate` did with a round's updates.

    accepted: clients whose deltas were averaged; rejected: {client: reason};
    skipped: why the round changed nothing (fewer than `min_updates` accepted), else None;
    entering: layers the re-selection adds to the GAL, whose values `Server.enter` must receive
    from the accepted clients before the new GAL takes effect (empty: nothing pending).
    """

    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    skipped: str | None = None
    entering: tuple[str, ...] = ()


class Server:
    """Holds the global trainable state and decides what travels each round."""

    def __init__(self, layout: AdapterLayout, initial_state: dict[str, torch.Tensor], cfg: FedConfig,
                 method: Method) -> None:
        n_layers = len(layout.layers)
        gal_size = cfg.gal_size if method.ranked else n_layers  # checked against the model by assembly.RunModel
        self.layout = layout
        self.state = {n: initial_state[n].detach().to(torch.float32).clone() for n in layout.all_names}
        self.gal_size = gal_size
        self.aggregate_all = not method.gal
        self.dense_all = not method.sparse
        self.cfg = cfg
        self.method = method
        # Ranking matters only when the GAL decides what travels or what trains densely.
        self.needs_ranking = gal_size < n_layers and not (self.aggregate_all and self.dense_all)
        self.gal: tuple[str, ...] = () if self.needs_ranking else tuple(layout.layers)
        self.layer_scores: dict[str, float] = {}
        self._proposed: tuple[str, ...] | None = None

    # ---- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"state": {n: t.clone() for n, t in self.state.items()}, "gal": list(self.gal),
                "layer_scores": dict(self.layer_scores)}

    def load_state_dict(self, saved: dict) -> None:
        tensors = saved["state"]
        if set(tensors) != set(self.state) or any(tuple(t.shape) != tuple(self.state[n].shape)
                                                  for n, t in tensors.items()):
            raise ValueError("saved server state does not match the model's trainable parameters")
        unknown = [l for l in saved["gal"] if l not in self.layout.layers]
        if unknown:
            raise ValueError(f"saved GAL names layers the model does not have: {unknown[:3]}")
        self.state = {n: t.to(torch.float32, copy=True) for n, t in tensors.items()}
        self.gal = tuple(saved["gal"])
        self.layer_scores = {k: float(v) for k, v in saved["layer_scores"].items()}

    # ---- GAL -----------------------------------------------------------------------------------

    def _read_scores(self, payload: bytes) -> dict[str, float]:
        tensors = codec.decode(payload)
        vector = tensors.get(LAYER_SCORES)
        if set(tensors) != {LAYER_SCORES} or vector is None or tuple(vector.shape) != (len(self.layout.layers),):
            raise codec.PayloadError(f"layer scores must be one tensor {LAYER_SCORES!r} of shape "
                                     f"({len(self.layout.layers)},)")
        if not torch.isfinite(vector).all() or (vector < 0).any():
            raise codec.PayloadError("layer scores are not all finite and >= 0")
        return dict(zip(self.layout.layers, vector.tolist()))

    def _ranked(self, score_payloads: list[tuple[int, bytes, float]]) -> tuple[str, ...] | None:
        """The top gal_size layers by the clients' combined scores; None when no scores are usable."""
        scores, weights = [], []
        for cid, payload, weight in score_payloads:
            try:
                scores.append(self._read_scores(payload))
                weights.append(weight)
            except codec.PayloadError as err:
                log.warning("client %s: layer scores rejected: %s", cid, err)
        if not scores:
            return None
        self.layer_scores = combine_layer_scores(scores, weights)
        chosen = set(select_gal(self.layer_scores, self.gal_size))
        return tuple(l for l in self.layout.layers if l in chosen)

    def select(self, score_payloads: list[tuple[int, bytes, float]]) -> tuple[str, ...]:
        """The first GAL, from clients' (cid, scores bytes, weight) on the initial weights.

        Every layer still holds its initial value everywhere, so the GAL takes effect at once. With
        no usable scores the first gal_size layers are taken (and a warning logged).
        """
        ranked = self._ranked(score_payloads)
        if ranked is None:
            log.warning("no usable layer scores: the GAL is the first %d layers", self.gal_size)
            ranked = tuple(self.layout.layers[: self.gal_size])
        self.gal = ranked
        return self.gal

    # ---- rounds --------------------------------------------------------------------------------

    def plan(self, round_idx: int) -> RoundPlan:
        if self.needs_ranking and not self.gal:
            raise RuntimeError("the GAL is not selected yet: call select() with the clients' initial scores")
        everything = tuple(self.layout.layers)
        every = self.cfg.reselect_every
        want = self.needs_ranking and every > 0 and (round_idx + 1) % every == 0
        return RoundPlan(round_idx, everything if self.aggregate_all else self.gal,
                         everything if self.dense_all else self.gal, want)

    def shared_names(self) -> list[str]:
        """What every client holds from the server after a round: the aggregated layers' travelling
        factors and the head."""
        return self.method.payload_names(self.layout, self.layout.layers if self.aggregate_all else self.gal)

    def payload(self, plan: RoundPlan) -> bytes:
        """The weights the clients load this round: the sent LoRA layers and the head."""
        return codec.encode({n: self.state[n] for n in self.method.payload_names(self.layout, plan.sent)}, values=self.cfg.values)

    def _decoded(self, payload: bytes, names: list[str]) -> dict[str, torch.Tensor]:
        """`payload` decoded and checked to hold exactly `names`, with the state's shapes, finite floats."""
        tensors = codec.decode(payload)
        if set(tensors) != set(names):
            missing = sorted(set(names) - set(tensors))
            extra = sorted(set(tensors) - set(names))
            raise codec.PayloadError(f"tensor names differ from the plan (missing {missing[:3]}, "
                                     f"unexpected {extra[:3]})")
        for name in names:
            if tuple(tensors[name].shape) != tuple(self.state[name].shape):
                raise codec.PayloadError(f"{name} has shape {tuple(tensors[name].shape)}, "
                                         f"expected {tuple(self.state[name].shape)}")
            if not tensors[name].is_floating_point() or not torch.isfinite(tensors[name]).all():
                raise codec.PayloadError(f"{name} is not a finite float tensor")
        return tensors

    def _check(self, plan: RoundPlan, update: ClientUpdate) -> dict[str, torch.Tensor]:
        delta = self._decoded(update.payload, self.method.payload_names(self.layout, plan.sent))
        if isinstance(update.num_samples, bool) or not (isinstance(update.num_samples, int) and update.num_samples > 0):
            raise codec.PayloadError(f"num_samples must be a positive int, got {update.num_samples!r}")
        return delta

    def _weighted_mean(self, tensors: list[dict[str, torch.Tensor]], weights: list[float],
                       names: list[str]) -> dict[str, torch.Tensor]:
        total = math.fsum(weights)
        return {n: sum(t[n].to(torch.float32) * (w / total) for t, w in zip(tensors, weights)) for n in names}

    def aggregate(self, plan: RoundPlan, updates: list[ClientUpdate]) -> AggregateResult:
        """Check every update, then add `server_lr` times the sample-weighted mean delta to the sent
        layers and head.

        Rejected, each with a logged reason: an update that fails to decode or does not match the
        plan (names, shapes, finiteness, sample count), and one whose delta norm exceeds
        `max_norm_ratio` times the median norm of the round's well-formed updates. With fewer than
        `min_updates` accepted the round changes nothing (`skipped`). When the plan asked for layer
        scores the GAL is re-selected; layers that enter it are returned in `entering`.
        """
        result = AggregateResult()
        checked = []
        for update in updates:
            try:
                checked.append((update, self._check(plan, update)))
            except codec.PayloadError as err:
                result.rejected[update.cid] = str(err)
        ratio = self.cfg.max_norm_ratio
        if ratio > 0 and checked:
            norms = [math.sqrt(math.fsum(float(t.double().square().sum()) for t in d.values())) for _, d in checked]
            bound = ratio * statistics.median(norms)
            for (update, _), norm in zip(list(checked), norms):
                if norm > bound:
                    result.rejected[update.cid] = (f"delta norm {norm:.4g} exceeds {ratio:g} x the round's "
                                                   f"median {bound / ratio:.4g}")
            checked = [(u, d) for u, d in checked if u.cid not in result.rejected]
        for cid, reason in result.rejected.items():
            log.warning("client %s: update rejected: %s", cid, reason)
        result.accepted = [u.cid for u, _ in checked]
        if len(checked) < self.cfg.min_updates:
            result.skipped = (f"{len(checked)} accepted update(s), fewer than min_updates={self.cfg.min_updates}: "
                              f"the global state is unchanged")
            log.warning("round %d: %s", plan.round_idx + 1, result.skipped)
            return result
        names = self.method.payload_names(self.layout, plan.sent)
        mean = self._weighted_mean([d for _, d in checked], [float(u.num_samples) for u, _ in checked], names)
        for name in names:
            self.state[name] += self.cfg.server_lr * mean[name]
        if plan.want_scores:
            ranked = self._ranked([(u.cid, u.scores, float(u.num_samples)) for u, _ in checked if u.scores])
            if ranked is not None:
                entering = tuple(l for l in ranked if l not in self.gal)
                if entering and not self.aggregate_all:
                    self._proposed = ranked
                    result.entering = entering
                else:
                    self.gal = ranked
        return result

    def enter(self, values: list[tuple[int, bytes, float]]) -> list[int]:
        """Complete a re-selection: the entering layers start from the weighted mean of the clients'
        values (cid, codec bytes of the layers' factors, weight = samples). Returns the clients
        whose values were used. If none are usable the re-selection is dropped and the GAL stays."""
        if self._proposed is None:
            raise RuntimeError("no re-selection is waiting for layer values")
        proposed, self._proposed = self._proposed, None
        names = self.method.sent_names(self.layout, tuple(l for l in proposed if l not in self.gal))
        usable, weights, used = [], [], []
        for cid, payload, weight in values:
            try:
                usable.append(self._decoded(payload, names))
            except codec.PayloadError as err:
                log.warning("client %s: layer values rejected: %s", cid, err)
                continue
            weights.append(weight)
            used.append(cid)
        if not usable:
            log.warning("no client sent usable values of the entering layers: the GAL stays %s", self.gal)
            return []
        self.state.update(self._weighted_mean(usable, weights, names))
        self.gal = proposed
        return used
