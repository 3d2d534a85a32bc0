"""One FibecFed device: curriculum, sparse local update, and the bytes it sends back.

Engine-neutral: the client gets the server's payload (bytes) and a `RoundPlan`, trains the
one shared model instance it is handed, and answers with a `ClientUpdate` (bytes plus a few
scalars). Its personalised LoRA weights (every layer that is not aggregated) stay here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import codec
from ..curriculum import CurriculumSampler, difficulty_scores
from ..data import TextClassificationData, make_batches, model_inputs
from ..modeling import AdapterLayout, get_state, set_state
from ..optim import MaskedAdamW
from ..selection import NeuronImportance, layer_sensitivity, select_neurons

LAYER_SCORES = "layer_scores"


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
class ClientOptions:
    """Local-training settings shared by all clients of a run, taken from the run's FedConfig
    (simulation.client_options), where the defaults live (docs/ALGORITHM.md, Driver)."""

    curriculum: bool
    class_balanced: bool
    sparse: bool
    ranker: str
    rho: float
    neuron_momentum: float
    pacing: str
    lambda0: float
    full_at: int
    rescore_every: int
    local_steps: int
    batch_size: int
    max_length: int
    lr: float
    values: str
    seed: int
    weight_decay: float = 0.0


def within_label_rank(scores: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """Each score replaced by its rank fraction among the samples of the same label: (rank + 0.5) / n_c.

    Sorting by it interleaves the labels, so the easiest fraction of the data holds that fraction
    of every label. Without it, Fisher scores on a fresh model rank by label (the untrained head
    already favours one class, whose samples then have small gradients) and the first curriculum
    rounds would see mostly one label.
    """
    ranked = torch.empty_like(scores, dtype=torch.float32)
    y = torch.as_tensor(labels)
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        order = torch.sort(scores[members], stable=True).indices
        ranked[members[order]] = (torch.arange(len(members), dtype=torch.float32) + 0.5) / len(members)
    return ranked


class Client:
    """A device holding its data, its personalised LoRA weights and its curriculum state."""

    def __init__(self, cid: int, data: TextClassificationData, tokenizer, layout: AdapterLayout,
                 initial_state: dict[str, torch.Tensor], options: ClientOptions) -> None:
        if len(data) == 0:
            raise ValueError(f"client {cid} has no data")
        self.cid = cid
        self.data = data
        self.tokenizer = tokenizer
        self.layout = layout
        self.options = options
        self.state = {n: t.clone() for n, t in initial_state.items()}
        self.importance = NeuronImportance(options.neuron_momentum)
        self.sampler: CurriculumSampler | None = None
        self.prepared_at: int | None = None

    def __len__(self) -> int:
        return len(self.data)

    # ---- helpers -------------------------------------------------------------------------------

    def _batch(self, positions: list[int]) -> dict[str, torch.Tensor]:
        return next(make_batches(self.data, self.tokenizer, positions, len(positions),
                                 max_length=self.options.max_length))

    def _all_batches(self):
        return make_batches(self.data, self.tokenizer, None, self.options.batch_size,
                            max_length=self.options.max_length)

    def _score(self, model: torch.nn.Module, round_idx: int) -> dict[str, float]:
        """Difficulty-score the local data on the model as loaded; returns the layers' Fisher traces."""
        scores, fisher, traces = difficulty_scores(model, self._all_batches(), num_samples=len(self.data),
                                                   return_fisher=True)
        if self.options.class_balanced:
            scores = within_label_rank(scores, self.data.labels)
        if self.options.curriculum:
            if self.sampler is None:
                self.sampler = CurriculumSampler(scores, batch_size=self.options.batch_size,
                                                 pacing=self.options.pacing, lambda0=self.options.lambda0,
                                                 full_at=self.options.full_at, seed=self._seed(0))
            else:
                self.sampler.update_scores(scores)
        if self.prepared_at is None:
            self.importance.update(fisher)  # the initial neuron importance
        self.prepared_at = round_idx
        return traces

    def _ensure_sampler(self, model: torch.nn.Module, round_idx: int) -> None:
        o = self.options
        needs_scores = o.curriculum or o.sparse
        if needs_scores and (self.prepared_at is None or
                             (o.rescore_every and round_idx - self.prepared_at >= o.rescore_every)):
            self._score(model, round_idx)
        if self.sampler is None:  # no curriculum: the whole local set, reshuffled each pass
            self.sampler = CurriculumSampler(torch.zeros(len(self.data)), batch_size=o.batch_size,
                                             lambda0=1.0, full_at=1, seed=self._seed(0))

    def _seed(self, round_idx: int) -> int:
        return (self.options.seed * 1_000_003 + self.cid * 10_007 + round_idx) % (2**31)

    def _layer_scores(self, model: torch.nn.Module, fisher_traces: dict[str, float], round_idx: int) -> bytes:
        if self.options.ranker == "fisher":
            scores = fisher_traces
        else:
            batches = make_batches(self.data, self.tokenizer, None, self.options.batch_size,
                                   max_length=self.options.max_length, shuffle=True, seed=self._seed(round_idx))
            scores = layer_sensitivity(model, batches, layers=list(self.layout.layers), seed=self._seed(round_idx))
        vector = torch.tensor([float(scores[l]) for l in self.layout.layers], dtype=torch.float32)
        return codec.encode({LAYER_SCORES: vector}, check_finite=True)

    # ---- the protocol --------------------------------------------------------------------------

    def initial_scores(self, model: torch.nn.Module) -> bytes:
        """Layer scores on the initial weights (the first GAL ranking), as codec bytes.

        Runs the difficulty-scoring pass too (its Fisher traces are the `fisher` ranker's scores).
        """
        set_state(model, self.state)
        traces = self._score(model, 0) if (self.options.curriculum or self.options.sparse
                                          or self.options.ranker == "fisher") else {}
        return self._layer_scores(model, traces, 0)

    def fit(self, model: torch.nn.Module, payload: bytes, plan: RoundPlan) -> ClientUpdate:
        """Load the received weights, train `local_steps` curriculum batches, return the update."""
        o = self.options
        received = codec.decode(payload)
        expected = set(self.layout.param_names(plan.sent)) | set(self.layout.head)
        if set(received) != expected:
            raise codec.PayloadError(f"server payload has tensors {sorted(set(received) ^ expected)[:4]} "
                                     f"that the plan does not name")
        received = {n: t.to(torch.float32) for n, t in received.items()}
        self.state.update(received)
        set_state(model, self.state)
        self._ensure_sampler(model, plan.round_idx)
        torch.manual_seed(self._seed(plan.round_idx))

        masks = self._neuron_masks(plan) if o.sparse else {}
        params = dict(model.named_parameters())
        trainable = [params[n] for n in self.layout.all_names]
        optimizer = MaskedAdamW(trainable, lr=o.lr, weight_decay=o.weight_decay)
        optimizer.set_masks({params[self.layout.factors[layer][k]]: pair
                             for layer, factors in masks.items() for k, pair in factors.items()})

        batches = self.sampler.batches(plan.round_idx, o.local_steps)
        model.train()
        losses = []
        collect = o.sparse or (plan.want_scores and o.ranker == "fisher")
        if collect:
            from ..fisher import FisherCollector

            with FisherCollector(model, "lora", loss_reduction="mean") as fc:
                losses = self._train(model, optimizer, batches, fc)
                fisher = {l: {k: v.clone() for k, v in f.items()} for l, f in fc.fisher.items()}
                traces = dict(fc.layer_traces)
            self.importance.update(fisher)
        else:
            losses = self._train(model, optimizer, batches, None)
            traces = {}
        model.eval()

        trained = get_state(model, self.layout.all_names)
        sent_names = self.layout.param_names(plan.sent) + list(self.layout.head)
        delta = {n: trained[n] - received[n] for n in sent_names}
        sparse_masks = {self.layout.factors[layer][k]: pair for layer, factors in masks.items()
                        for k, pair in factors.items() if self.layout.factors[layer][k] in delta}
        upload = codec.encode(delta, masks=sparse_masks or None, values=o.values)
        self.state = trained
        scores = self._layer_scores(model, traces, plan.round_idx) if plan.want_scores else b""

        lora_total = sum(params[n].numel() for n in self.layout.param_names(self.layout.layers))
        frozen = sum(params[self.layout.factors[layer][k]].numel() * (1.0 - mask.float().mean().item())
                     for layer, factors in masks.items() for k, (mask, _) in factors.items())
        used = len({i for b in batches for i in b})
        return ClientUpdate(self.cid, upload, scores, len(self.data), {
            "train_loss": float(sum(losses) / len(losses)) if losses else math.nan,
            "masked_fraction": frozen / lora_total,
            "curriculum_fraction": self.sampler.fraction(plan.round_idx),
            "samples_seen": used,
        })

    def _neuron_masks(self, plan: RoundPlan):
        """Top-rho neuron masks for every LoRA layer that does not train densely this round."""
        dense = set(plan.dense)
        scores = {l: s for l, s in self.importance.scores.items() if l not in dense and l in self.layout.factors}
        return select_neurons(scores, self.options.rho) if scores else {}

    def _train(self, model, optimizer, batches, collector) -> list[float]:
        losses = []
        device = next(model.parameters()).device
        for positions in batches:
            batch = self._batch(positions)
            if collector is not None:
                collector.token_mask = batch["attention_mask"]
            out = model(**{k: v.to(device) for k, v in model_inputs(batch).items()})
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            losses.append(float(out.loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        return losses
