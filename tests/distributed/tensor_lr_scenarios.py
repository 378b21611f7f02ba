"""A tensor ``lr`` under a distributed strategy (importable by spawned processes)."""

from __future__ import annotations

import torch

from distsoap import SOAP


def build_and_step(rank: int, world: int, lr_on_rank_1: float) -> str:
    """Build SOAP (ddp) with an fp32 tensor lr of 1e-2 (``lr_on_rank_1`` on rank 1); step."""
    lr = torch.tensor(lr_on_rank_1 if rank == 1 else 1e-2)
    params = [torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(3))]
    try:
        opt = SOAP(params, lr=lr, strategy="ddp")
    except ValueError as error:
        return str(error)
    for _ in range(3):
        for p in params:
            p.grad = torch.full_like(p, 0.5)  # the same on every rank, as DDP makes them
        opt.step()
    return "stepped"
