"""A sharded run's state gathered onto rank 0, saved from rank 0 alone, loaded on every rank.

What HF Trainer (DDP) and Lightning (DDP) do with ``optimizer.state_dict()``, here by hand:
train ``[0, save_at)``, ``consolidate_state_dict()`` on every rank, rank 0 ``torch.save``-s its
``state_dict()``; then a fresh run loads that one file on every rank and trains on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from distsoap import SOAP
from tests.distributed.checkpoint_scenarios import CKPT_SHAPES, _wrap
from tests.distributed.scenarios import OPTIONS, ProblemModel


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _keys(state_dict: dict) -> int:
    """State entries (block, key) in a state dict: per-owner blocks, or rank-tagged shards."""
    return sum(len(entry) for entry in state_dict["state"].values())


def run(rank: int, world: int, strategy: str, folder: str, save_at: int | None, stop: int) -> dict:
    """Train to ``stop``; consolidate and save at ``save_at``, or (None) load and continue."""
    model = ProblemModel(torch.float64, CKPT_SHAPES, skips="none")
    forward, soap_strategy = _wrap(model, strategy, world)
    opt = SOAP(model.param_groups(), strategy=soap_strategy, **OPTIONS)
    start, report = 0, {}
    if save_at is None:
        start = int(Path(folder, "step").read_text())
        opt.load_state_dict(torch.load(Path(folder, "optimizer.pt"), weights_only=True))
        weights = torch.load(Path(folder, f"weights{rank}.pt"), weights_only=True)
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                _local(p).copy_(w)
    for step in range(start, stop):
        opt.zero_grad(set_to_none=True)
        forward(step, rank, (rank, world)).backward()
        opt.step()
        if step + 1 == save_at:
            mine = _keys(opt.state_dict())
            opt.consolidate_state_dict(to=0)
            everything = opt.state_dict()
            report["keys_before"] = mine
            report["keys_after"] = _keys(everything)
            torch.save(
                [_local(p).detach().clone() for p in model.parameters()],
                Path(folder, f"weights{rank}.pt"),
            )
            if rank == 0:
                torch.save(everything, Path(folder, "optimizer.pt"))
                Path(folder, "step").write_text(str(save_at))
            dist.barrier()
    # after a step the gathered copy is gone: rank 0 holds its own blocks again
    report["keys_at_end"] = _keys(opt.state_dict())
    report["params"] = [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for p in model.parameters()
    ]
    return report
