"""Zero-size parameters under the distributed strategies (importable by spawned processes)."""

from __future__ import annotations

import torch
from torch import nn

from distsoap import SOAP
from tests.distributed.scenarios import wrap_for

SHAPES = [(16, 16), (12, 12), (24,), (8, 8)]
EMPTY_SHAPES = [(0, 3), (0,), (0, 3), (3, 0)]
STEPS = 8


class Blocks(nn.Module):
    """Linear least-squares blocks and zero-size parameters that are in the graph too."""

    def __init__(self, with_empty: bool = True):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.blocks = nn.ParameterList(
            nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES
        )
        self.sharded = False
        empty = EMPTY_SHAPES if with_empty else []
        self.empty = nn.ParameterList(
            nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in empty
        )

    def forward(self, step: int, rank: int, world: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 + step)
        total = 0.0
        if not self.sharded:  # FSDP2 cannot reduce-scatter empty gradients (torch's chunk_cat)
            total = sum(e.sum() for e in self.empty)  # empty gradients, on every rank
        for p in self.blocks:
            x = torch.randn(64, p.shape[-1], generator=gen, dtype=torch.float64)
            x = x[rank * 64 // world : (rank + 1) * 64 // world]
            y = x @ p.T if p.dim() == 2 else x * p
            total = total + y.square().mean()
        return total


def train(rank: int, world: int, strategy: str) -> dict:
    """Train with zero-size parameters; return the full parameters and who holds state."""
    model = Blocks()
    forward = wrap_for(model, strategy, world)
    model.sharded = strategy == "fsdp2"
    opt = SOAP(model.parameters(), lr=1e-2, precondition_frequency=3, strategy=strategy)
    for step in range(STEPS):
        opt.zero_grad()
        forward(step, rank, world).backward()
        if model.sharded:  # what the other strategies get: an empty (DTensor) gradient
            for p in model.empty:
                p.grad = torch.zeros_like(p)
        opt.step()
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return {
        "params": [p.detach().clone() for p in full],
        "empty_state": [len(opt.state[p]) for p in model.empty],
    }


def single_process(world: int) -> list[torch.Tensor]:
    """The same training, full batch, one process, without the zero-size parameters."""
    model = Blocks(with_empty=False)
    opt = SOAP(model.parameters(), lr=1e-2, precondition_frequency=3, strategy="single")
    for step in range(STEPS):
        opt.zero_grad()
        (sum(model(step, r, world) for r in range(world)) / world).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]
