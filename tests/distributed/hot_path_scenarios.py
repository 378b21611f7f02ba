"""What each rank runs in the hot-path tests: the tensor ops of one step, counted."""

from __future__ import annotations

import torch
from torch import nn

from distsoap import SOAP
from distsoap.testing.op_count import CountOps

SHAPES = [(6, 5), (7,), (3, 4, 2)]


class Blocks(nn.Module):
    """``copies`` parameters of each of SHAPES, scored by a random linear loss."""

    def __init__(self, copies: int):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.blocks = nn.ParameterList(
            [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES * copies]
        )

    def forward(self, step: int, rank: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 * step + rank)
        return sum((p * torch.randn(p.shape, generator=gen)).sum() ** 2 for p in self.blocks)


def ops_per_step(rank: int, world: int, strategy: str, copies: int) -> dict[str, int]:
    """The ops of ``optimizer.step()`` on a refresh step (update 3) and the step after it.

    Keys ``refresh`` and ``plain``: non-view ops; ``refresh_from_host`` and
    ``plain_from_host``: of those, tensors built from host data (a synchronous host-to-device
    copy on a GPU).
    """
    model = Blocks(copies)
    forward = model
    if strategy == "ddp":
        forward = nn.parallel.DistributedDataParallel(model)
    if strategy.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = SOAP(model.parameters(), strategy=strategy, precondition_frequency=3, weight_decay=0.1)
    counts = {}
    for step in range(5):  # call 0 is the first call; update 3 refreshes
        opt.zero_grad(set_to_none=True)
        if strategy == "zero2" and step >= 3:
            # set directly, so no backward hook sends a bucket: step() packs and sends them all
            for p in model.parameters():
                p.grad = torch.randn_like(p)
        else:
            forward(step, rank).backward()
        if step >= 3:
            name = "refresh" if step == 3 else "plain"
            with CountOps() as counter:
                opt.step()
            counts[name], counts[f"{name}_from_host"] = counter.count, counter.host_tensors
        else:
            opt.step()
    return counts
