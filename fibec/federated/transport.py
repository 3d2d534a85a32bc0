"""How the round loop reaches the clients: the `Transport` protocol and its in-process implementation.

Every exchange carries bytes (codec payloads), so an engine that sends messages (Flower) and the
in-process engine run the same rounds. A client that fails or does not answer is left out of the
exchange; `take_failures()` reports it for the round's record.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .. import codec
from ..modeling import set_state
from .client import Client, ClientUpdate, RoundPlan
from .evaluation import Evaluator, Score


class Transport(Protocol):
    def initial_scores(self, cids: list[int]) -> list[tuple[int, bytes, float]]:
        """(cid, layer-score bytes, weight = samples) on the initial weights, for the first GAL."""

    def fit(self, cids: list[int], payload: bytes, plan: RoundPlan) -> list[ClientUpdate]:
        """Each client's update for the server's payload and plan."""

    def layer_values(self, cids: list[int], layers: tuple[str, ...]) -> list[tuple[int, bytes, float]]:
        """(cid, codec bytes of the layers' current factors, weight): values of layers entering the GAL."""

    def evaluate_personal(self, shared: bytes) -> Score:
        """Every client's model (its own layers + `shared`, codec bytes) on its own share, summed."""

    def take_failures(self) -> dict[int, str]:
        """{cid: reason} of the clients that failed since the last call."""


class InProcessTransport:
    """Every client call is a method call on ONE shared model instance, one client after another."""

    def __init__(self, model: torch.nn.Module, clients: list[Client], evaluator: Evaluator) -> None:
        self.model = model
        self.clients = clients
        self.evaluator = evaluator

    def initial_scores(self, cids: list[int]) -> list[tuple[int, bytes, float]]:
        return [(cid, self.clients[cid].initial_scores(self.model), float(len(self.clients[cid]))) for cid in cids]

    def fit(self, cids: list[int], payload: bytes, plan: RoundPlan) -> list[ClientUpdate]:
        return [self.clients[cid].fit(self.model, payload, plan) for cid in cids]

    def layer_values(self, cids: list[int], layers: tuple[str, ...]) -> list[tuple[int, bytes, float]]:
        return [(cid, self.clients[cid].layer_values(layers), float(len(self.clients[cid]))) for cid in cids]

    def evaluate_personal(self, shared: bytes) -> Score:
        received = codec.decode(shared)
        total = Score()
        for client, share in zip(self.clients, self.evaluator.shares):
            if share is not None:
                total += personal_score(self.model, client, received, self.evaluator)
        return total

    def take_failures(self) -> dict[int, str]:
        return {}


def personal_score(model: torch.nn.Module, client: Client, shared: dict[str, torch.Tensor],
                   evaluator: Evaluator) -> Score:
    """One client's model (its own state overlaid with the `shared` tensors) on its own share."""
    unknown = sorted(n for n, t in shared.items()
                     if n not in client.state or tuple(t.shape) != tuple(client.state[n].shape))
    if unknown:
        raise codec.PayloadError(f"evaluation payload has unknown or misshapen tensors {unknown[:3]}")
    set_state(model, client.state)
    set_state(model, shared)
    return evaluator.score(model, evaluator.shares[client.cid])
