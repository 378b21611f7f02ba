"""Non-finite gradients under the distributed strategies (importable by spawned processes)."""

from __future__ import annotations

import torch
from torch import nn

from distsoap import SOAP
from distsoap.faults import NumericalFaultError
from tests.distributed.scenarios import wrap_for

SHAPES = [(16, 16), (12, 12), (24,), (8, 8)]
BAD_STEP, BAD_BLOCK = 5, 1


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.blocks = nn.ParameterList(
            nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES
        )

    def forward(self, step: int, rank: int, world: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 + step)
        total = 0.0
        for p in self.blocks:
            x = torch.randn(64, p.shape[-1], generator=gen, dtype=torch.float64)
            x = x[rank * 64 // world : (rank + 1) * 64 // world]
            y = x @ p.T if p.dim() == 2 else x * p
            total = total + y.square().mean()
        return total


def train(rank: int, world: int, strategy: str, policy: str, steps: int = 10):
    """Train; at BAD_STEP rank 0's local gradient of BAD_BLOCK holds a NaN, before any
    synchronisation (a tensor hook for ddp / zero2; FSDP2's sharded gradient afterwards, which
    still reaches the block's owner through distsoap's own exchange)."""
    model = Blocks()
    forward = wrap_for(model, strategy, world)
    opt = SOAP(
        model.parameters(),
        lr=1e-2,
        precondition_frequency=3,
        strategy=strategy,
        nonfinite_grads=policy,
    )
    current = {"step": -1}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        if current["step"] == BAD_STEP and rank == 0:
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
        return grad

    if strategy != "fsdp2":
        model.blocks[BAD_BLOCK].register_hook(poison)
    try:
        for step in range(steps):
            current["step"] = step
            opt.zero_grad()
            forward(step, rank, world).backward()
            if strategy == "fsdp2" and step == BAD_STEP and rank == 0:
                model.blocks[BAD_BLOCK].grad.to_local().view(-1)[0] = float("nan")
            opt.step()
    except NumericalFaultError as error:
        return {"error": str(error)}
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    skips = sum(s.get("nonfinite_skips", 0) for s in opt.state.values())
    return {"params": [p.detach().clone() for p in full], "skips": skips}


def single_process_skip(world: int, steps: int = 10) -> list[torch.Tensor]:
    """Single process on the full batch where BAD_BLOCK has no gradient at BAD_STEP."""
    model = Blocks()
    opt = SOAP(model.parameters(), lr=1e-2, precondition_frequency=3, strategy="single")
    for step in range(steps):
        opt.zero_grad()
        (sum(model(step, r, world) for r in range(world)) / world).backward()
        if step == BAD_STEP:
            model.blocks[BAD_BLOCK].grad = None
        opt.step()
    return [p.detach().clone() for p in model.parameters()]
