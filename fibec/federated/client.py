"""One FibecFed device: curriculum, sparse local update, and the bytes it sends back.

Engine-neutral: the client gets the server's payload (bytes) and a `RoundPlan`, trains the one
shared model instance it is handed, and answers with a `ClientUpdate` (bytes plus a few scalars).
Its personalised LoRA weights (every layer that is not aggregated), its neuron importance and its
difficulty scores stay here; `state_dict()` / `load_state_dict()` carry them across processes
(Flower) and crashes (checkpoints).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .. import codec
from .._checks import fraction_count
from ..config import FedConfig
from ..curriculum import CurriculumSampler, DifficultyTracker, difficulty_scores, scores_on_host, within_label_rank
from ..data import TextClassificationData, make_batches, model_inputs, shortest_first, token_lengths
from ..fisher import FisherCollector
from ..modeling import AdapterLayout, get_state, set_state
from ..optim import MaskedAdamW
from ..selection import NeuronImportance, layer_sensitivity, select_neurons
from . import seeds
from .methods import Method

LAYER_SCORES = "layer_scores"
# Batches a client scores the layers on for the first GAL ranking (both rankers).
RANKING_BATCHES = 2


@dataclass(frozen=True)
class RoundPlan:
    """What the server asks of the clients in one round.

    sent: LoRA layers whose weights the server sends and aggregates (the GAL; every layer in
    fedavg / no-gal); dense: LoRA layers trained densely (the rest train their top-rho neurons
    when the method is sparse); want_scores: return layer scores for the next GAL ranking.
    """

    round_idx: int
    sent: tuple[str, ...]
    dense: tuple[str, ...]
    want_scores: bool = False


@dataclass
class ClientUpdate:
    """A client's answer: `payload` (codec bytes of the deltas of the sent layers and the head),
    `scores` (codec bytes of the layer-score vector, or b"" when not asked) and metrics."""

    cid: int
    payload: bytes
    scores: bytes
    num_samples: int
    metrics: dict = field(default_factory=dict)

    @property
    def uploaded_bytes(self) -> int:
        return len(self.payload) + len(self.scores)


@dataclass(frozen=True)
class ClientSettings:
    """What a Client reads of the run's config, and nothing else: its local training, curriculum,
    sparse update, layer ranking and upload settings, and the run's seed (FedConfig documents each)."""

    lr: float
    local_steps: int
    scale_steps: bool
    batch_size: int
    max_length: int
    logit_adjust: float
    pacing: str
    lambda0: float
    full_at: int
    class_balanced: bool
    difficulty_prior: str
    score_batch_size: int
    rho: float
    neuron_momentum: float
    gal_ranker: str
    values: str
    upload_density: float
    error_feedback: bool
    seed: int

    @classmethod
    def of(cls, cfg: FedConfig) -> ClientSettings:
        """The settings of `cfg` a Client reads."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


def encode_layer_scores(scores: dict[str, float], layers: tuple[str, ...]) -> bytes:
    """One score per LoRA layer, in layout order, as a codec payload."""
    vector = torch.tensor([float(scores[layer]) for layer in layers], dtype=torch.float32)
    return codec.encode({LAYER_SCORES: vector}, check_finite=True)


def _clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): the two clocks of a client's compute."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def largest_entries_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """bool mask of values' shape keeping its ceil(density * size) entries of largest magnitude."""
    k = fraction_count(density, values.numel())
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.topk(values.abs().flatten(), k, sorted=False).indices] = True
    return mask.view_as(values)


class Client:
    """A device holding its data, its personalised LoRA weights and its curriculum state."""

    def __init__(self, cid: int, data: TextClassificationData, tokenizer, layout: AdapterLayout,
                 initial_state: dict[str, torch.Tensor], settings: ClientSettings, method: Method) -> None:
        if len(data) == 0:
            raise ValueError(f"client {cid} has no data")
        self.cid = cid
        self.data = data
        self.tokenizer = tokenizer
        self.layout = layout
        self.settings = settings
        self.method = method
        self.state = {n: t.clone() for n, t in initial_state.items()}
        self.importance = NeuronImportance(settings.neuron_momentum)
        lengths = token_lengths(data, tokenizer, max_length=settings.max_length)
        self.tracker = DifficultyTracker(lengths, data.labels if settings.class_balanced else None)
        self.rounds_trained = 0
        self.pending_compute_s = 0.0  # work since the last update reported it (the first GAL ranking)
        self.pending_cpu_s = 0.0  # the same work's CPU seconds (a shared or paused machine does not count)
        self.pending_scoring_s = 0.0  # of which the Fisher scoring pass over all local data
        self.residual: dict[str, torch.Tensor] = {}  # error feedback: what the uploads have not delivered yet
        counts = torch.tensor(data.label_counts(), dtype=torch.float32)
        self.log_prior = torch.log((counts + 1) / (counts.sum() + counts.numel()))  # add-one smoothed
        self.sampler = CurriculumSampler(np.zeros(len(data)), batch_size=settings.batch_size, pacing=settings.pacing,
                                         lambda0=settings.lambda0 if method.curriculum else 1.0,
                                         full_at=settings.full_at, seed=self._seed(0))
        self._reorder()

    def __len__(self) -> int:
        return len(self.data)

    # ---- state across processes and crashes ----------------------------------------------------

    def state_dict(self) -> dict:
        """Everything that changes as the client trains: tensors and plain values, nested dicts."""
        return {"state": {n: t.clone() for n, t in self.state.items()},
                "importance": self.importance.state_dict(), "tracker": self.tracker.state_dict(),
                "rounds_trained": self.rounds_trained, "pending_compute_s": self.pending_compute_s,
                "pending_cpu_s": self.pending_cpu_s,
                "pending_scoring_s": self.pending_scoring_s,
                "residual": {n: r.clone() for n, r in self.residual.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; ValueError when it does not fit this client's model or data."""
        tensors = state["state"]
        if set(tensors) != set(self.state):
            raise ValueError(f"client {self.cid}: saved tensors {sorted(set(tensors) ^ set(self.state))[:3]} "
                             f"do not match the model's trainable parameters")
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(self.state[name].shape):
                raise ValueError(f"client {self.cid}: saved {name} has shape {tuple(value.shape)}, "
                                 f"the model's has {tuple(self.state[name].shape)}")
        if len(state["tracker"]["scores"]) != len(self.data):
            raise ValueError(f"client {self.cid}: saved difficulty scores are for {len(state['tracker']['scores'])} "
                             f"samples, the client holds {len(self.data)}")
        self.state = {n: t.to(torch.float32, copy=True) for n, t in tensors.items()}
        self.importance.load_state_dict(state["importance"])
        self.tracker.load_state_dict(state["tracker"])
        self.rounds_trained = int(state["rounds_trained"])
        self.pending_compute_s = float(state["pending_compute_s"])
        self.pending_cpu_s = float(state.get("pending_cpu_s", 0.0))  # absent from checkpoints before it
        self.pending_scoring_s = float(state.get("pending_scoring_s", 0.0))  # absent from checkpoints before it
        unknown = [n for n in state["residual"] if n not in self.state]
        if unknown:
            raise ValueError(f"client {self.cid}: saved residual of unknown tensors {unknown[:3]}")
        self.residual = {n: r.to(torch.float32, copy=True) for n, r in state["residual"].items()}
        self._reorder()

    # ---- the protocol --------------------------------------------------------------------------

    def initial_scores(self, model: torch.nn.Module) -> bytes:
        """Layer scores on the initial weights (the first GAL ranking), as codec bytes.

        Both rankers look at RANKING_BATCHES shuffled local batches. The `fisher` ranker's pass
        also yields difficulty scores for those samples and the first neuron importance, which
        the client keeps (with the `full` difficulty prior it scores all its data here).
        """
        start = _clock()
        set_state(model, self.state)
        if self.settings.gal_ranker == "sensitivity":
            scores = layer_sensitivity(model, self._shuffled_batches(0), layers=list(self.layout.layers),
                                       num_batches=RANKING_BATCHES, seed=self._seed(0))
        else:
            scores = self._score(model, full=self._full_pass_due())
        wall, cpu = _since(start)
        self.pending_compute_s += wall
        self.pending_cpu_s += cpu
        return encode_layer_scores(scores, self.layout.layers)

    def fit(self, model: torch.nn.Module, payload: bytes, plan: RoundPlan) -> ClientUpdate:
        """Load the received weights, train `local_steps` curriculum batches, return the update."""
        start = _clock()
        settings = self.settings
        received = codec.decode(payload)
        sent_names = self.method.payload_names(self.layout, plan.sent)
        expected = set(sent_names)
        if set(received) != expected:
            raise codec.PayloadError(f"server payload has tensors {sorted(set(received) ^ expected)[:4]} "
                                     f"that the plan does not name")
        received = {n: t.to(torch.float32) for n, t in received.items()}
        self.state.update(received)
        set_state(model, self.state)
        if self._full_pass_due():
            self._score(model, full=True)

        torch.manual_seed(self._seed(plan.round_idx))
        masks = self._neuron_masks(plan) if self.method.sparse else {}
        params = dict(model.named_parameters())
        model_device = next(model.parameters()).device
        trained_names = set(self.method.trained_names(self.layout, self.layout.layers)) | set(self.layout.head)
        frozen_factors = [params[n] for n in self.layout.all_names if n not in trained_names]
        for p in frozen_factors:  # no gradient is computed for what the method does not train
            p.requires_grad_(False)
        optimizer = MaskedAdamW([params[n] for n in self.layout.all_names if n in trained_names], lr=settings.lr)
        optimizer.set_masks({params[self.layout.factors[layer][k]]: (mask.to(model_device), dim)
                             for layer, factors in masks.items() for k, (mask, dim) in factors.items()})
        batches = self.sampler.batches(plan.round_idx, self._local_steps(plan.round_idx))
        # The collector's per-sample traces re-score the curriculum and its Fisher feeds the neuron
        # importance and the fisher ranker; fedavg trains without it.
        collect = self.method.curriculum or self.method.sparse or (plan.want_scores and settings.gal_ranker == "fisher")
        traces: dict[str, float] = {}
        if collect:
            with FisherCollector(model, self.layout.layers, loss_reduction="mean") as collector:
                losses = self._train(model, optimizer, batches, collector)
                traces = collector.layer_traces
                if self.method.sparse:
                    self.importance.update(collector.fisher)
            self._reorder()
        else:
            losses = self._train(model, optimizer, batches, None)
        model.eval()
        for p in frozen_factors:
            p.requires_grad_(True)

        trained = get_state(model, self.layout.all_names)
        delta = {n: trained[n] - received[n] for n in sent_names}
        sparse_masks = {self.layout.factors[layer][k]: (mask.cpu(), dim) for layer, factors in masks.items()
                        for k, (mask, dim) in factors.items() if self.layout.factors[layer][k] in delta}
        upload = self._encode_with_error_feedback(delta, sparse_masks)
        self.state = trained
        self.rounds_trained += 1
        scores = b""
        if plan.want_scores:
            if settings.gal_ranker == "sensitivity":
                traces = layer_sensitivity(model, self._shuffled_batches(plan.round_idx),
                                           layers=list(self.layout.layers), num_batches=RANKING_BATCHES,
                                           seed=self._seed(plan.round_idx))
            scores = encode_layer_scores(traces, self.layout.layers)

        pending, self.pending_compute_s = self.pending_compute_s, 0.0
        pending_cpu, self.pending_cpu_s = self.pending_cpu_s, 0.0
        wall, cpu = _since(start)
        scoring, self.pending_scoring_s = self.pending_scoring_s, 0.0
        lora_total = sum(params[n].numel() for n in self.layout.param_names(self.layout.layers))
        frozen = sum(params[self.layout.factors[layer][k]].numel() * (1.0 - mask.float().mean().item())
                     for layer, factors in masks.items() for k, (mask, _) in factors.items())
        return ClientUpdate(self.cid, upload, scores, len(self.data), {
            "train_loss": float(sum(losses) / len(losses)),
            "masked_fraction": frozen / lora_total,
            "curriculum_fraction": self.sampler.fraction(plan.round_idx),
            "samples_seen": len({i for b in batches for i in b}),
            "local_steps": len(batches),
            "compute_s": wall + pending,
            "cpu_s": cpu + pending_cpu,
            "scoring_s": scoring,
            # The share of this client's data whose difficulty is a measured Fisher score, not a prior.
            "fisher_scored": float(self.tracker.scored.mean()),
        })

    def layer_values(self, layers: tuple[str, ...]) -> bytes:
        """The full current values of `layers`' LoRA factors (codec bytes, the run's value format):
        what a layer entering the GAL starts from on the server."""
        if self.rounds_trained == 0:
            raise RuntimeError(f"client {self.cid} has not trained yet; its layers hold the initial values")
        names = self.method.sent_names(self.layout, layers)
        return codec.encode({n: self.state[n] for n in names}, values=self.settings.values)

    # ---- helpers -------------------------------------------------------------------------------

    def _local_steps(self, round_idx: int) -> int:
        """local_steps; with scale_steps, a curriculum round's share of them, ceil(lambda(t) * local_steps)."""
        if not (self.settings.scale_steps and self.method.curriculum):
            return self.settings.local_steps
        return fraction_count(self.sampler.fraction(round_idx), self.settings.local_steps)

    def _encode_with_error_feedback(self, delta: dict[str, torch.Tensor],
                                    masks: dict[str, tuple[torch.Tensor, int]]) -> bytes:
        """The upload of `delta`: lossy value formats and `upload_density` < 1 lose part of it; with
        error feedback, what the last uploads lost is added first and what this one loses is kept
        for the next.

        With `upload_density` < 1 each LoRA factor without a neuron mask sends only its largest
        entries in magnitude (ceil(density * size) of them, after the residual is added); the head
        always travels whole. Residuals of tensors that do not travel this round are dropped: they
        belong to a delta the server will not see again.
        """
        density = self.settings.upload_density
        lossy = self.settings.values != "fp32" or density < 1.0  # fp32, whole: nothing is lost
        feedback = self.settings.error_feedback and lossy
        if feedback:
            self.residual = {n: r for n, r in self.residual.items() if n in delta}
            delta = {n: d + self.residual[n] if n in self.residual else d for n, d in delta.items()}
        masks = dict(masks)
        if density < 1.0:
            head = set(self.layout.head)
            for name, d in delta.items():
                if name not in head and name not in masks:
                    masks[name] = largest_entries_mask(d, density)
        upload = codec.encode(delta, masks=masks or None, values=self.settings.values)
        if feedback:
            arrived = codec.decode(upload)
            self.residual = {n: d - arrived[n].to(torch.float32) for n, d in delta.items()}
        return upload

    def _seed(self, round_idx: int) -> int:
        return seeds.seed_for("client", self.settings.seed, client=self.cid, round_idx=round_idx)

    def _shuffled_batches(self, round_idx: int):
        return make_batches(self.data, self.tokenizer, None, self.settings.batch_size, max_length=self.settings.max_length,
                            shuffle=True, seed=self._seed(round_idx))

    def _full_pass_due(self) -> bool:
        return self.method.curriculum and self.settings.difficulty_prior == "full" and not self.tracker.scored.all()

    def _score(self, model: torch.nn.Module, *, full: bool) -> dict[str, float]:
        """One Fisher pass (no update) over all local data (`full`) or RANKING_BATCHES shuffled batches:
        difficulty scores of the samples it covers, the first neuron importance, the layers' traces.

        The full pass takes `score_batch_size` samples of similar length at a time (shortest first),
        so that little of it is padding; a sample's score does not depend on its batch."""
        start = time.perf_counter()
        if full:
            by_length = shortest_first(self.data, self.tokenizer, max_length=self.settings.max_length)
            batches = make_batches(self.data, self.tokenizer, by_length, self.settings.score_batch_size,
                                   max_length=self.settings.max_length)
        else:
            batches = (b for _, b in zip(range(RANKING_BATCHES), self._shuffled_batches(0)))
        scores, fisher, traces = difficulty_scores(model, batches, num_samples=len(self.data), return_fisher=True,
                                                   loss_fn=self._loss)
        if full:
            self.pending_scoring_s += time.perf_counter() - start
        self.tracker.observe(np.arange(len(self.data)), scores.numpy())
        if not self.importance.fisher:
            self.importance.update(fisher)
        self._reorder()
        return traces

    def _loss(self, out, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch-mean local loss: cross-entropy of the logits shifted by tau * log(local label prior).

        The logit-adjusted (balanced-softmax) loss of FedLC (Zhang et al., ICML 2022). Under label
        skew a client fits its own label mix; with tau = 0 it does so by moving the shared adapters
        and head towards an input-independent shift, and averaging clients of opposite skew leaves
        a collapsed representation (docs/ALGORITHM.md, "Why these defaults"). The prior absorbs the
        mix. Evaluation uses the plain logits.
        """
        logits = out.logits.float()
        if self.settings.logit_adjust:
            if self.log_prior.device != logits.device:  # moved once, not every step
                self.log_prior = self.log_prior.to(logits.device)
            logits = logits + self.settings.logit_adjust * self.log_prior
        return torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device))

    def _reorder(self) -> None:
        """The sampler's easiest-first order from the latest difficulty scores and estimates."""
        ranking = self.tracker.ranking()
        if self.settings.class_balanced:
            ranking = within_label_rank(ranking, self.data.labels)
        self.sampler.update_scores(ranking)

    def _neuron_masks(self, plan: RoundPlan):
        """Top-rho neuron masks for every LoRA layer that does not train densely this round."""
        dense = set(plan.dense)
        scores = {l: s for l, s in self.importance.scores.items() if l not in dense and l in self.layout.factors}
        return select_neurons(scores, self.settings.rho) if scores else {}

    def _train(self, model, optimizer, batches, collector) -> list[float]:
        """The round's optimiser steps; returns each step's loss. The losses and the per-sample
        scores stay where the model runs until the last step: reading them every step would make
        the host wait for a GPU after each one."""
        losses, scored = [], []
        device = next(model.parameters()).device
        model.train()
        for positions in batches:
            batch = next(make_batches(self.data, self.tokenizer, positions, len(positions),
                                      max_length=self.settings.max_length))
            if collector is not None:
                collector.token_mask = batch["attention_mask"]
            out = model(**{k: v.to(device) for k, v in model_inputs(batch).items()})
            loss = self._loss(out, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            if collector is not None and self.method.curriculum:
                scored.append((batch["index"], collector.sample_scores))
        optimizer.zero_grad(set_to_none=True)
        for index, scores in scores_on_host(scored):
            self.tracker.observe(index, scores)  # in step order: a later score of a sample wins
        return torch.stack(losses).float().cpu().tolist() if losses else []
