"""The methods a run can compare: FibecFed, FedAvg-LoRA and the ablations, as switches of three ideas."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import METHOD_NAMES
from ..modeling import LORA_FACTORS, AdapterLayout


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
    trained: tuple[str, ...] = LORA_FACTORS
    sent: tuple[str, ...] = LORA_FACTORS

    @property
    def personalised(self) -> bool:
        """Clients keep LoRA weights of their own, so each client's model differs from the global one."""
        return self.gal or set(self.trained) - set(self.sent) != set()

    def trained_names(self, layout: AdapterLayout, layers) -> list[str]:
        """Parameter names of the trained factors of `layers`, in layout order."""
        return layout.param_names(layers, self.trained)

    def sent_names(self, layout: AdapterLayout, layers) -> list[str]:
        """Parameter names of the travelling factors of `layers`, in layout order."""
        return layout.param_names(layers, self.sent)

    def payload_names(self, layout: AdapterLayout, layers) -> list[str]:
        """What a payload of `layers` carries: their travelling factors, then the head (always sent)."""
        return self.sent_names(layout, layers) + list(layout.head)


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
if tuple(METHODS) != METHOD_NAMES:  # the config declares the names its settings choose from
    raise ImportError(f"fibec.config.METHOD_NAMES {METHOD_NAMES} must list fibec.federated.methods.METHODS "
                      f"{tuple(METHODS)}")
