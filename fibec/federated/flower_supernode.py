"""`flower-supernode` with shorter waits: the same command, flags and behaviour, sooner to react.

flwr 1.41's SuperNode asks the SuperLink for a message, and when there is none waits 3 s before
asking again; it checks for its ClientApp's reply every 0.5 s. Every exchange of a FibecFed round
waits on both, which at fibec's sizes is longer than the round's work. This runs flwr's own
SuperNode with those waits capped at IDLE_WAIT_S: each ask is one small request to the SuperLink.
It replaces the `time` module that flwr.supernode.start_client_internal sleeps through (its only
use of it), so it is tied to flwr 1.41; tests/test_flower.py checks that the waits it caps are
still there.

    python -m fibec.federated.flower_supernode <any flower-supernode flags>
"""
from __future__ import annotations

import time

import flwr.supernode.start_client_internal as node_loop
from flwr.supernode.cli import flower_supernode

IDLE_WAIT_S = 0.2


class _CappedWaits:
    """The `time` module, with every sleep capped at IDLE_WAIT_S."""

    def __getattr__(self, name: str):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, IDLE_WAIT_S))


def main() -> None:
    node_loop.time = _CappedWaits()
    flower_supernode()


if __name__ == "__main__":
    main()
