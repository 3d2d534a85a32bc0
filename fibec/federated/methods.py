"""The methods a run can compare: FibecFed, FedAvg-LoRA and the ablations, as switches of three ideas."""
from __future__ import annotations

from dataclasses import dataclass

FACTORS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class Method:
    """Which of FibecFed's three ideas a method uses (docs/ALGORITHM.md, section 3).

    curriculum: train on the easiest fraction of the local data, growing each round.
    gal: send and aggregate only the global aggregation layers; the other LoRA layers stay on
        the clients (personalised). False: every LoRA layer travels.
    sparse: layers that do not train densely update only their top-rho neurons.
    ranked: the top-L ranked layers train densely (False: every layer does, no ranking).
    trained: the LoRA factors the clients train (FFA-LoRA freezes A).
    sent: the LoRA factors of the aggregated layers that travel and are aggregated; the others stay
        on the clients (FedSA-LoRA keeps B local).
    """

    curriculum: bool
    gal: bool
    sparse: bool
    ranked: bool = True
    trained: tuple[str, ...] = FACTORS
    sent: tuple[str, ...] = FACTORS

    @property
    def personalised(self) -> bool:
        """Clients keep LoRA weights of their own, so each client's model differs from the global one."""
        return self.gal or set(self.trained) - set(self.sent) != set()

    def trained_names(self, layout, layers) -> list[str]:
        """Parameter names of the trained factors of `layers`, in layout order."""
        return _factor_names(layout, layers, self.trained)

    def sent_names(self, layout, layers) -> list[str]:
        """Parameter names of the travelling factors of `layers`, in layout order."""
        return _factor_names(layout, layers, self.sent)


def _factor_names(layout, layers, factors: tuple[str, ...]) -> list[str]:
    wanted = set(layers)
    return [layout.factors[layer][k] for layer in layout.layers if layer in wanted for k in factors]


METHODS: dict[str, Method] = {
    "fibecfed": Method(curriculum=True, gal=True, sparse=True),
    "fedavg": Method(curriculum=False, gal=False, sparse=False, ranked=False),
    "no-curriculum": Method(curriculum=False, gal=True, sparse=True),
    "no-gal": Method(curriculum=True, gal=False, sparse=True),
    "no-sparse": Method(curriculum=True, gal=True, sparse=False),
    # Published communication-efficient baselines (docs/ALGORITHM.md, section 3).
    "ffa-lora": Method(curriculum=False, gal=False, sparse=False, ranked=False, trained=("lora_B",),
                       sent=("lora_B",)),
    "fedsa-lora": Method(curriculum=False, gal=False, sparse=False, ranked=False, sent=("lora_A",)),
}
