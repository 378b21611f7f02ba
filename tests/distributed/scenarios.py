"""What each rank runs in the distributed tests (module level, so spawned processes import it).

The model: at least 8 trainable blocks of mixed shapes (square matrices sharing a bucket, a conv,
a matrix with a dim above max_precond_dim, 1-D parameters, a scalar), a frozen parameter, a
parameter never used in forward, and two param groups with different hyperparameters. Its loss
is the full-rank regression problem of tests/problems.py, each rank scoring its shard of every
batch; the single-process reference averages the shard losses of all ranks.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from distsoap import SOAP
from tests.problems import RegressionProblem

SHAPES = [(16, 16), (16, 16), (16, 16), (24, 24), (8, 6, 3, 3), (12, 40), (32,), (16,), ()]
FROZEN_SHAPE = (16, 16)
UNUSED_SHAPE = (8, 8)
OPTIONS = dict(lr=1e-2, max_precond_dim=32, precondition_frequency=5)


def skipped(step: int, rank: int, skips: str = "per_rank") -> set[int]:
    """Blocks left out of a rank's loss.

    ``skips="global"``: block 1 on every rank every 4th step; ``"per_rank"``: also block 2 on
    rank 0 only every 3rd step (its gradient then comes from the other ranks); ``"none"``.
    """
    skip = {1} if step % 4 == 1 and skips != "none" else set()
    if skips == "per_rank" and rank == 0 and step % 3 == 2:
        skip.add(2)
    return skip


class ProblemModel(nn.Module):
    """The regression problem as a module (DDP needs one)."""

    def __init__(self, dtype: torch.dtype, shapes=SHAPES, skips: str = "per_rank"):
        super().__init__()
        self.skips = skips
        self.problem = RegressionProblem(shapes, dtype=dtype)
        self.blocks = nn.ParameterList(self.problem.make_params())
        self.frozen = nn.Parameter(torch.ones(FROZEN_SHAPE, dtype=dtype), requires_grad=False)
        self.unused = nn.Parameter(torch.ones(UNUSED_SHAPE, dtype=dtype))

    def forward(self, step: int, rank: int, shard: tuple[int, int]) -> torch.Tensor:
        skip = skipped(step, rank, self.skips)
        loss = self.problem.loss(list(self.blocks), step, skip, shard)
        return loss * self.frozen.mean()  # frozen at 1: scales nothing, gets no gradient

    def param_groups(self) -> list[dict]:
        blocks = list(self.blocks)
        if len(blocks) < 4:
            return [dict(params=blocks + [self.frozen, self.unused])]
        return [
            dict(params=blocks[:3] + blocks[4:] + [self.frozen, self.unused]),
            dict(params=[blocks[3]], betas=(0.9, 0.99), weight_decay=0.1, shampoo_beta=0.8),
        ]


def single_process_reference(
    dtype: torch.dtype,
    world: int,
    steps: int,
    shapes=SHAPES,
    skips: str = "per_rank",
    lr_decay: float = 1.0,
    soap_kwargs: dict | None = None,
) -> list:
    """Single-process SOAP on the average of every rank's shard loss (the full batch)."""
    model = ProblemModel(dtype, shapes, skips)
    opt = SOAP(model.param_groups(), strategy="single", **OPTIONS, **(soap_kwargs or {}))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = OPTIONS["lr"] * lr_decay**step
        opt.zero_grad(set_to_none=True)
        loss = sum(model(step, r, (r, world)) for r in range(world)) / world
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def train_data_parallel(
    rank: int,
    world: int,
    strategy: str,
    dtype: torch.dtype,
    steps: int,
    accumulate: int = 1,
    comm_dtype: torch.dtype | None = None,
    shapes=SHAPES,
    soap_kwargs: dict | None = None,
) -> dict:
    """Train on this rank's shard with strategy "ddp" (DDP-wrapped) or "zero2" (no wrapper)."""
    model = ProblemModel(dtype, shapes)
    forward = model
    if strategy == "ddp":
        forward = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = SOAP(
        model.param_groups(),
        strategy=strategy,
        comm_dtype=comm_dtype,
        **OPTIONS,
        **(soap_kwargs or {}),
    )
    bytes_per_step = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        for micro in range(accumulate):
            last = micro == accumulate - 1
            sync = nullcontext() if last or strategy != "zero2" else opt.no_sync()
            if strategy == "ddp" and not last:
                sync = forward.no_sync()
            with sync:
                shard = (rank * accumulate + micro, world * accumulate)
                (forward(step, rank, shard) / accumulate).backward()
        opt.step()
        bytes_per_step.append(dict(opt.comm_stats["last_step_bytes"]))
    owned = {i for i, p in enumerate(model.parameters()) if len(opt.state[p]) > 0}
    state_bytes = opt.state_bytes()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "bytes_per_step": bytes_per_step,
        "owned": owned,
        "owners": list(opt.strategy.owners),
        "pieces": [(p.param, p.owner, p.rows) for p in opt.strategy.pieces],
        "state_bytes": state_bytes,
        "numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "n_trainable": sum(1 for p in model.parameters() if p.requires_grad),
    }


def train_with_clipping(rank: int, world: int, max_norm: float, steps: int) -> list:
    """zero2 with the optimizer's own clipping of the synchronised gradients."""
    model = ProblemModel(torch.float64)
    opt = SOAP(model.param_groups(), strategy="zero2", **OPTIONS)
    norms = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        model(step, rank, (rank, world)).backward()
        norms.append(float(opt.clip_grad_norm_(max_norm)))
        opt.step()
    return [[p.detach().clone() for p in model.parameters()], norms]


def clipped_reference(world: int, max_norm: float, steps: int) -> list:
    """Single process, full batch, torch's clip_grad_norm_."""
    model = ProblemModel(torch.float64)
    opt = SOAP(model.param_groups(), strategy="single", **OPTIONS)
    norms = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        (sum(model(step, r, (r, world)) for r in range(world)) / world).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
    return [[p.detach().clone() for p in model.parameters()], norms]


def build_and_report(rank: int, world: int, variant: str) -> str:
    """Build an optimizer whose construction differs on rank 1; return the error text."""
    shapes = [(4, 4), (3,)]
    if variant == "shapes" and rank == 1:
        shapes = [(4, 5), (3,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    kwargs = {"strategy": "zero2" if variant == "strategy" and rank == 1 else "ddp"}
    if variant == "hyperparameters" and rank == 1:
        kwargs["lr"] = 0.5
    if variant == "bucket_cap_mb" and rank == 1:
        kwargs["bucket_cap_mb"] = 1.0
    if variant == "split_blocks" and rank == 1:  # placement differs: must not reach a collective
        kwargs["split_blocks"] = "never"
    if variant == "count" and rank == 1:
        params.append(torch.nn.Parameter(torch.zeros(2)))
    try:
        SOAP(params, **kwargs)
    except ValueError as error:
        return str(error)
    return "no error"


def ddp_strategy_without_wrapper(rank: int, world: int) -> str:
    """strategy="ddp" on a model that is not DDP-wrapped: gradients differ across ranks."""
    model = ProblemModel(torch.float32)
    opt = SOAP(model.param_groups(), strategy="ddp", **OPTIONS)
    model(0, rank, (rank, world)).backward()
    try:
        opt.step()
    except RuntimeError as error:
        return str(error)
    return "no error"


def state_balance(rank: int, world: int) -> dict:
    """A GPT-shaped model with many blocks: per-rank SOAP state after two steps."""
    d = 32
    shapes = [(128, d)] + [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)] * 6
    gen = torch.Generator().manual_seed(0)  # zero2 replicas must start equal
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    opt = SOAP(params, strategy="zero2")
    for _ in range(2):
        opt.zero_grad()
        sum((p * torch.randn_like(p)).sum() for p in params).backward()
        opt.step()
    held = {i for i, p in enumerate(params) if len(opt.state[p]) > 0}
    nbytes = opt.state_bytes()
    return {"held": held, "bytes": nbytes, "owners": opt.strategy.owners}


def wrap_for(model: nn.Module, strategy: str, world: int) -> nn.Module:
    """What the model runs forward as: DDP-wrapped for ``ddp``, FSDP2-sharded (in place) for
    ``fsdp2`` on a 1-D mesh of ``world`` ranks, else as it is."""
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model
