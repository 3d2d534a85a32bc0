"""The round loop: the server side of a run, step by step, over any `Transport`.

`Coordinator` holds what the server side of a run owns besides the `Server`: the client sampling
generator, the global evaluation, the per-round records and their byte and time accounting. Its
steps (`begin`, `select_initial`, `plan`, `aggregate`, `enter`, `finish`) are the same whatever
carries the messages: `run_rounds` drives them over a Transport (in process), and the Flower
strategy calls them from its configure/aggregate hooks.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import codec
from ..config import FedConfig
from . import seeds
from .client import ClientUpdate, RoundPlan
from .evaluation import Evaluator, Score
from .methods import METHODS
from .recorder import Recorder
from .server import AggregateResult, Server
from .transport import Transport


@dataclass(frozen=True)
class RoundStart:
    round_idx: int
    chosen: list[int]
    needs_initial_scores: bool


class Coordinator:
    """One method's run on the server side: sampling, server steps, evaluation, records.

    `on_round_end(coordinator)` is called after each round's record is written (the runner writes
    the checkpoint there).
    """

    def __init__(self, cfg: FedConfig, method: str, server: Server, evaluator: Evaluator, model: torch.nn.Module,
                 recorder: Recorder, *, on_round_end: Callable[[Coordinator], None] | None = None) -> None:
        self.cfg = cfg
        self.method = method
        self.personalised = METHODS[method].personalised
        self.server = server
        self.evaluator = evaluator
        self.model = model
        self.recorder = recorder
        self.on_round_end = on_round_end
        self.rng = seeds.generator("client sampling", cfg.seed)
        self.records: list[dict] = []
        self._round: dict | None = None
        self._plan: RoundPlan | None = None
        self._started = 0.0

    # ---- state ---------------------------------------------------------------------------------

    @property
    def rounds_done(self) -> int:
        return len(self.records)

    @property
    def done(self) -> bool:
        return self.rounds_done >= self.cfg.rounds

    def state_dict(self) -> dict:
        return {"server": self.server.state_dict(), "sampling_rng": self.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "records": list(self.records)}

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])
        self.rng.bit_generator.state = state["sampling_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.records = list(state["records"])

    # ---- one round -----------------------------------------------------------------------------

    def begin(self) -> RoundStart:
        """Open the next round: sample `clients_per_round` clients without replacement."""
        if self.done:
            raise RuntimeError(f"all {self.cfg.rounds} rounds are done")
        round_idx = self.rounds_done
        self._started = time.perf_counter()
        chosen = sorted(int(c) for c in self.rng.choice(self.cfg.clients, size=self.cfg.clients_per_round,
                                                        replace=False))
        self._round = {"round": round_idx + 1, "method": self.method, "clients": chosen,
                       "uploaded_bytes": 0, "downloaded_bytes": 0, "client_uploaded_bytes": {},
                       "client_compute_s": {}, "client_cpu_s": {}}
        return RoundStart(round_idx, chosen, round_idx == 0 and self.server.needs_ranking and not self.server.gal)

    def _upload(self, cid: int, nbytes: int) -> None:
        per_client = self._round["client_uploaded_bytes"]
        per_client[str(cid)] = per_client.get(str(cid), 0) + nbytes
        self._round["uploaded_bytes"] += nbytes

    def select_initial(self, scores: list[tuple[int, bytes, float]]) -> None:
        """The first GAL from the clients' (cid, layer-score bytes, weight)."""
        for cid, payload, _ in scores:
            self._upload(cid, len(payload))
        self.server.select(scores)

    def plan(self) -> tuple[RoundPlan, bytes]:
        """This round's plan and the payload every chosen client downloads."""
        self._plan = self.server.plan(self.rounds_done)
        payload = self.server.payload(self._plan)
        self._round["gal"] = list(self.server.gal)
        self._round["downloaded_bytes"] += len(payload) * len(self._round["clients"])
        return self._plan, payload

    def aggregate(self, updates: list[ClientUpdate]) -> AggregateResult:
        """Fold the updates in; the result's `entering` layers need `enter` before the round ends."""
        for update in updates:
            self._upload(update.cid, update.uploaded_bytes)
            self._round["client_compute_s"][str(update.cid)] = update.metrics.get("compute_s", 0.0)
            self._round["client_cpu_s"][str(update.cid)] = update.metrics.get("cpu_s", 0.0)
        result = self.server.aggregate(self._plan, updates)
        record = self._round
        record["accepted"] = result.accepted
        record["rejected"] = {str(k): v for k, v in result.rejected.items()}
        if result.skipped:
            record["skipped"] = result.skipped
        for key in ("train_loss", "curriculum_fraction", "masked_fraction", "local_steps", "fisher_scored"):
            values = [u.metrics[key] for u in updates]
            record[key] = float(np.mean(values)) if values else float("nan")
        # Per client: the share of its data with a measured Fisher score (the rest: the prior's
        # estimate), and the seconds of its compute spent on the scoring pass over all its data.
        record["client_fisher_scored"] = {str(u.cid): u.metrics["fisher_scored"] for u in updates}
        record["scoring_s"] = float(sum(u.metrics["scoring_s"] for u in updates))
        return result

    def enter(self, values: list[tuple[int, bytes, float]]) -> None:
        """Values of the layers entering the GAL, from the clients that just trained them."""
        for cid, payload, _ in values:
            self._upload(cid, len(payload))
        used = self.server.enter(values)
        self._round["entering_from"] = used

    def _due(self, every: int) -> bool:
        """Whether the round in progress is every `every`-th one or the last."""
        n = self.rounds_done + 1
        return n % every == 0 or n == self.cfg.rounds

    @property
    def evaluates(self) -> bool:
        """Whether this round ends with an evaluation (every eval_every rounds and the last one)."""
        return self._due(self.cfg.eval_every)

    @property
    def evaluates_personal(self) -> bool:
        """Whether that evaluation includes the personalised protocol (every personal_eval_every
        rounds and the last one)."""
        return self.evaluates and self._due(self.cfg.personal_eval_every)

    def shared_payload(self) -> bytes:
        """What every client holds from the server now, in the run's value format (for the
        personalised evaluation)."""
        return codec.encode({n: self.server.state[n] for n in self.server.shared_names()}, values=self.cfg.values)

    def finish(self, personal: Score | None, failures: dict[int, str]) -> dict:
        """Close the round: evaluate (global protocol here, personalised from `personal`), write the
        record, call on_round_end. Returns the record."""
        record = self._round
        record["gal_next"] = list(self.server.gal)
        if failures:
            record["failed"] = {str(cid): reason for cid, reason in sorted(failures.items())}
        record["compute_s"] = float(sum(record["client_compute_s"].values()))
        record["cpu_s"] = float(sum(record["client_cpu_s"].values()))
        previous = self.records[-1] if self.records else {}
        record["cum_uploaded_bytes"] = previous.get("cum_uploaded_bytes", 0) + record["uploaded_bytes"]
        record["cum_downloaded_bytes"] = previous.get("cum_downloaded_bytes", 0) + record["downloaded_bytes"]
        record["cum_compute_s"] = previous.get("cum_compute_s", 0.0) + record["compute_s"]
        record["cum_cpu_s"] = previous.get("cum_cpu_s", 0.0) + record["cpu_s"]
        if self.evaluates:
            record["eval_split"] = self.cfg.eval_on
            overall = self.evaluator.global_score(self.model, self.server.state)
            record["global_accuracy"], record["global_loss"] = overall.accuracy, overall.loss
        if self.evaluates_personal:
            if personal is None:
                personal = overall
            record["personal_accuracy"], record["personal_loss"] = personal.accuracy, personal.loss
            record["majority_accuracy"] = self.evaluator.majority
        record["wall_time"] = time.perf_counter() - self._started
        record["elapsed"] = previous.get("elapsed", 0.0) + record["wall_time"]
        self.records.append(record)
        self._round = self._plan = None
        self.recorder.add(record)
        if self.on_round_end is not None:
            self.on_round_end(self)
        return record


def run_rounds(coordinator: Coordinator, transport: Transport) -> list[dict]:
    """Every remaining round of `coordinator`'s run, each client exchange through `transport`."""
    while not coordinator.done:
        start = coordinator.begin()
        if start.needs_initial_scores:
            coordinator.select_initial(transport.initial_scores(start.chosen))
        plan, payload = coordinator.plan()
        result = coordinator.aggregate(transport.fit(start.chosen, payload, plan))
        if result.entering:
            coordinator.enter(transport.layer_values(result.accepted, result.entering))
        personal = None
        if coordinator.evaluates_personal and coordinator.personalised:
            personal = transport.evaluate_personal(coordinator.shared_payload())
        coordinator.finish(personal, transport.take_failures())
    return coordinator.records
