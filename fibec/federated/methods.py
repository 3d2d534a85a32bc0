"""The methods a run can compare: FibecFed, FedAvg-LoRA and the ablations, as switches of three ideas."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """Which of FibecFed's three ideas a method uses (docs/ALGORITHM.md, section 3).

    curriculum: train on the easiest fraction of the local data, growing each round.
    gal: send and aggregate only the global aggregation layers; the other LoRA layers stay on
        the clients (personalised). False: every LoRA layer travels.
    sparse: layers that do not train densely update only their top-rho neurons.
    ranked: the top-L ranked layers train densely (False: every layer does, no ranking).
    """

    curriculum: bool
    gal: bool
    sparse: bool
    ranked: bool = True

    @property
    def personalised(self) -> bool:
        """Clients keep LoRA layers of their own, so each client's model differs from the global one."""
        return self.gal


METHODS: dict[str, Method] = {
    "fibecfed": Method(curriculum=True, gal=True, sparse=True),
    "fedavg": Method(curriculum=False, gal=False, sparse=False, ranked=False),
    "no-curriculum": Method(curriculum=False, gal=True, sparse=True),
    "no-gal": Method(curriculum=True, gal=False, sparse=True),
    "no-sparse": Method(curriculum=True, gal=True, sparse=False),
}
