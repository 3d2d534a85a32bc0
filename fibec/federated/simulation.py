"""The default engine: every client in one process, one after another, on ONE model instance.

Memory is one model plus each client's adapter tensors (LoRA factors and head, a few hundred
KB for MiniLM): a client's weights are copied into the shared model before it trains and out
after. Everything is drawn from the run's seed, so a run is repeatable bit for bit on one machine.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import TextClassificationData, dirichlet_partition, make_batches, model_inputs
from ..modeling import AdapterLayout, get_state, load_classifier, set_state
from .client import Client, ClientOptions, ClientUpdate, RoundPlan
from .server import Server


@dataclass(frozen=True)
class Method:
    """Which of FibecFed's three ideas a method uses."""

    curriculum: bool
    gal: bool  # aggregate (and send) only the GAL; False: every LoRA layer travels
    sparse: bool  # non-dense layers train only their top-rho neurons
    ranked: bool = True  # the top-L ranked layers train densely (False: every layer does)


METHODS: dict[str, Method] = {
    "fibecfed": Method(curriculum=True, gal=True, sparse=True),
    "fedavg": Method(curriculum=False, gal=False, sparse=False, ranked=False),
    "no-curriculum": Method(curriculum=False, gal=True, sparse=True),
    "no-gal": Method(curriculum=True, gal=False, sparse=True),
    "no-sparse": Method(curriculum=True, gal=True, sparse=False),
}
# Methods whose non-aggregated LoRA layers stay personalised on the clients.
PERSONALISED = {name for name, m in METHODS.items() if m.gal}


@dataclass
class FedConfig:
    """Every setting of a federated run; defaults are those of `fibec run` (docs/ALGORITHM.md)."""

    model: str | None = None
    data: str = "default"
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None
    test_fraction: float = 0.2
    default_train: int = 360
    default_test: int = 200
    clients: int = 6
    clients_per_round: int = 3
    rounds: int = 8
    alpha: float = 1.0
    method: str = "fibecfed"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)
    gal_size: int = 6
    gal_ranker: str = "fisher"
    reselect_every: int = 4
    rescore_every: int = 0
    rho: float = 0.25
    neuron_momentum: float = 0.9
    pacing: str = "linear"
    class_balanced: bool = True
    lambda0: float = 0.3
    full_at: int = 5
    local_steps: int = 6
    batch_size: int = 16
    max_length: int = 48
    lr: float = 5e-3
    values: str = "fp32"
    seed: int = 0
    eval_every: int = 1
    eval_samples: int = 100
    threads: int = 1
    out: str = "runs/fibec"


def client_options(cfg: FedConfig, method: Method) -> ClientOptions:
    return ClientOptions(curriculum=method.curriculum, sparse=method.sparse, ranker=cfg.gal_ranker, rho=cfg.rho,
                         neuron_momentum=cfg.neuron_momentum, pacing=cfg.pacing, class_balanced=cfg.class_balanced,
                         lambda0=cfg.lambda0,
                         full_at=cfg.full_at, rescore_every=cfg.rescore_every, local_steps=cfg.local_steps,
                         batch_size=cfg.batch_size, max_length=cfg.max_length, lr=cfg.lr, values=cfg.values,
                         seed=cfg.seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TextClassificationData, tokenizer, *, batch_size: int,
             max_length: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the model as loaded on all of `data`."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for batch in make_batches(data, tokenizer, None, batch_size, max_length=max_length):
        logits = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(data), loss_sum / len(data)


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


class Simulation:
    """One method on one partition: clients, server, the shared model and the round loop."""

    def __init__(self, cfg: FedConfig, method_name: str, train: TextClassificationData,
                 test: TextClassificationData, partition: list[list[int]], model_path: str) -> None:
        self.cfg = cfg
        self.method_name = method_name
        self.method = METHODS[method_name]
        self.model, self.tokenizer = load_classifier(model_path, train.num_labels, lora_r=cfg.lora_r,
                                                     lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                     targets=cfg.lora_targets or None, seed=cfg.seed)
        self.layout = AdapterLayout.of(self.model)
        initial = get_state(self.model, self.layout.all_names)
        n_layers = len(self.layout.layers)
        gal_size = n_layers if not self.method.ranked else cfg.gal_size
        self.server = Server(self.layout, initial, gal_size=gal_size, aggregate_all=not self.method.gal,
                             dense_all=not self.method.sparse, reselect_every=cfg.reselect_every,
                             values=cfg.values)
        options = client_options(cfg, self.method)
        self.clients = [Client(cid, train.subset(part), self.tokenizer, self.layout, initial, options)
                        for cid, part in enumerate(partition)]
        share_indices = self._draw_test_shares(test)
        self.shares = [test.subset(idx) if idx else None for idx in share_indices]
        self.test = test.subset(sorted(i for idx in share_indices for i in idx))  # every evaluated sample
        self.rng = np.random.default_rng(cfg.seed)

    def sample_clients(self) -> list[Client]:
        k = min(self.cfg.clients_per_round, len(self.clients))
        return [self.clients[i] for i in sorted(self.rng.choice(len(self.clients), size=k, replace=False))]

    def _draw_test_shares(self, test: TextClassificationData) -> list[list[int]]:
        """Each client's test share (indices into `test`): drawn once (seeded), sized like the
        client's data and with the client's label mix (largest remainder at both levels),
        `eval_samples` in all. A class whose test samples run out is topped up from the class
        with most left."""
        rng = np.random.default_rng([self.cfg.seed, 1])
        labels = np.asarray(test.labels)
        pools = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in range(test.num_labels)]
        total = len(test) if self.cfg.eval_samples <= 0 else min(self.cfg.eval_samples, len(test))
        shares = []
        for client, size in zip(self.clients, _apportion([len(c) for c in self.clients], total)):
            picked = []
            for c, count in enumerate(_apportion(client.data.label_counts(), size)):
                for _ in range(count):
                    pool = pools[c] if pools[c] else max(pools, key=len)
                    picked.append(pool.pop())
            shares.append(sorted(picked))
        return shares

    def _test_shares(self) -> list[TextClassificationData | None]:
        """The clients' test shares (None for an empty one); together they are `self.test`."""
        return self.shares

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, loss) pooled over the clients' test shares (`_test_shares`; the same samples
        for every method). Methods that aggregate every layer evaluate the global model on every
        share; personalised methods evaluate each client's model (global sent layers and head +
        its own other layers) on its own share."""
        kwargs = dict(batch_size=self.cfg.batch_size * 4, max_length=self.cfg.max_length)
        personalised = self.method_name in PERSONALISED
        shared = {n: self.server.state[n] for n in self.layout.param_names(self.server.gal) + list(self.layout.head)}
        if not personalised:
            set_state(self.model, self.server.state)
        correct = loss = 0.0
        count = 0
        for client, share in zip(self.clients, self.shares):
            if share is None:
                continue
            if personalised:
                set_state(self.model, client.state)
                set_state(self.model, shared)
            a, l = evaluate(self.model, share, self.tokenizer, **kwargs)
            correct += a * len(share)
            loss += l * len(share)
            count += len(share)
        return correct / count, loss / count

    # ---- the in-process transport: every client call is a method call on the shared model ----

    def initial_scores(self, chosen: list[int], round_idx: int) -> list[tuple[int, bytes, float]]:
        """(cid, layer-score bytes, weight) of each chosen client, for the first GAL ranking."""
        return [(cid, self.clients[cid].initial_scores(self.model), float(len(self.clients[cid]))) for cid in chosen]

    def fit(self, chosen: list[int], payload: bytes, plan: RoundPlan) -> list[ClientUpdate]:
        """Each chosen client's update for the server's payload and plan."""
        return [self.clients[cid].fit(self.model, payload, plan) for cid in chosen]

    def evaluate_round(self, round_idx: int) -> tuple[float, float]:
        return self.evaluate()

    def run(self, metrics_path: Path | None = None, progress: bool = True, transport=None) -> list[dict]:
        """Run every round; returns (and appends to metrics_path as JSONL) one dict per round.

        `transport` carries the client calls (`initial_scores`, `fit`, `evaluate_round`, as on this
        class, which is the default); the Flower engine passes one that sends messages instead,
        whose clients may fail: such a transport's `take_failures()` gives {client: reason} for
        the round, recorded under "failed" (their updates are simply missing).
        """
        cfg = self.cfg
        transport = self if transport is None else transport
        records: list[dict] = []
        cum_up = cum_down = 0
        start = time.perf_counter()
        out = metrics_path.open("w") if metrics_path is not None else None
        bar = tqdm(range(cfg.rounds), desc=f"{self.method_name:>13}", unit="round", disable=not progress,
                   dynamic_ncols=True)
        try:
            for round_idx in bar:
                t0 = time.perf_counter()
                chosen = [c.cid for c in self.sample_clients()]
                up = down = 0
                if round_idx == 0 and self.server.needs_ranking:
                    initial = transport.initial_scores(chosen, round_idx)
                    up += sum(len(p) for _, p, _ in initial)
                    self.server.select(initial)
                plan = self.server.plan(round_idx)
                gal = list(self.server.gal)
                payload = self.server.payload(plan)
                updates = transport.fit(chosen, payload, plan)
                down += len(payload) * len(chosen)
                up += sum(u.uploaded_bytes for u in updates)
                result = self.server.aggregate(plan, updates)
                cum_up += up
                cum_down += down
                record = {
                    "round": round_idx + 1, "method": self.method_name, "clients": chosen,
                    "uploaded_bytes": up, "downloaded_bytes": down,
                    "cum_uploaded_bytes": cum_up, "cum_downloaded_bytes": cum_down,
                    "train_loss": float(np.mean([u.metrics["train_loss"] for u in updates])),
                    "curriculum_fraction": float(np.mean([u.metrics["curriculum_fraction"] for u in updates])),
                    "masked_fraction": float(np.mean([u.metrics["masked_fraction"] for u in updates])),
                    "gal": gal, "rejected": {str(k): v for k, v in result.rejected.items()},
                }
                if (round_idx + 1) % cfg.eval_every == 0 or round_idx + 1 == cfg.rounds:
                    record["test_accuracy"], record["test_loss"] = transport.evaluate_round(round_idx)
                    bar.set_postfix(acc=f"{record['test_accuracy']:.3f}", up=f"{cum_up / 1e6:.2f}MB")
                failed = transport.take_failures() if hasattr(transport, "take_failures") else {}
                if failed:
                    record["failed"] = {str(cid): reason for cid, reason in sorted(failed.items())}
                record["wall_time"] = time.perf_counter() - t0
                record["elapsed"] = time.perf_counter() - start
                records.append(record)
                if out is not None:
                    out.write(json.dumps(record) + "\n")
                    out.flush()
        finally:
            bar.close()
            if out is not None:
                out.close()
        return records


def run_methods(cfg: FedConfig, methods: list[str], train: TextClassificationData, test: TextClassificationData,
                model_path: str, out_dir: Path | None = None, progress: bool = True) -> dict[str, list[dict]]:
    """Run each method on the same Dirichlet partition and seed; returns {method: records}."""
    partition = partition_for(cfg, train)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    results = {}
    with torch_settings(cfg):
        for name in methods:
            sim = Simulation(cfg, name, train, test, partition, model_path)
            path = None if out_dir is None else out_dir / f"metrics_{name}.jsonl"
            results[name] = sim.run(path, progress=progress)
    return results


def partition_for(cfg: FedConfig, train: TextClassificationData) -> list[list[int]]:
    """The run's Dirichlet partition of `train`, drawn from the seed: every engine gives every
    client the same data."""
    return dirichlet_partition(train.labels, cfg.clients, cfg.alpha, min_size=cfg.batch_size // 2 or 1,
                               seed=cfg.seed)


@contextlib.contextmanager
def torch_settings(cfg: FedConfig):
    """A run's torch settings (deterministic algorithms, cfg.threads threads), restored after."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
