"""The app's own model and data: a linear regression, each node holding a slice of one synthetic set."""
from __future__ import annotations

import torch
from torch import nn

FEATURES = 8
SAMPLES_PER_NODE = 64


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, 1)


def node_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [64, 8], y [64, 1]) of node `partition_id`: y = x @ w + 0.1 noise, w shared by all nodes."""
    w = torch.linspace(-1.0, 1.0, FEATURES).unsqueeze(1)
    x = torch.randn(SAMPLES_PER_NODE, FEATURES, generator=torch.Generator().manual_seed(partition_id))
    return x, x @ w + 0.1 * torch.randn(SAMPLES_PER_NODE, 1, generator=torch.Generator().manual_seed(-1 - partition_id))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float) -> float:
    """`steps` full-batch SGD steps on the mean squared error; returns the last loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    return loss.item()
