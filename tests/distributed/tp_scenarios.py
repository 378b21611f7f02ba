"""What each rank runs in the FSDP2 x tensor-parallel tests (importable by spawned processes).

A two-layer MLP, its first Linear colwise-parallel and its second rowwise-parallel over the
``tp`` mesh dim, then ``fully_shard`` over the data-parallel dims: the layouts torchtitan gives
a transformer's projections. 6 hidden units are 3 per TP rank (tensor parallelism needs even
splits of the activations), then 2 / 1 per FSDP rank: uneven pieces. Ranks of one
data-parallel coordinate see the same batch (tensor parallelism splits the model, not the data).

Well-conditioned, so trajectories can be compared (docs/algorithm.md): square 6 x 6 weights and
64 samples per batch make every gradient full rank from the first step (a non-square gradient
leaves the larger factor rank-deficient, whose eigenvectors are arbitrary in its null space),
and input columns scaled from 0.5 to 2 keep the factors' eigenvalues apart.
"""

from __future__ import annotations

import torch
from torch import nn

from distsoap import SOAP

IN = HIDDEN = OUT = 6
BATCH = 64
OPTIONS = dict(lr=3e-2, precondition_frequency=2, weight_decay=0.01)


def make_model(dtype: torch.dtype) -> nn.Module:
    """The MLP, identical on every rank and in the single-process reference."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(IN, HIDDEN))
    model.add_module("act", nn.Tanh())
    model.add_module("down", nn.Linear(HIDDEN, OUT))
    return model.to(dtype)


def batch(step: int, dp_index: int, dtype: torch.dtype) -> torch.Tensor:
    """The batch of data-parallel coordinate ``dp_index`` at ``step``."""
    gen = torch.Generator().manual_seed(1000 * step + dp_index)
    spread = torch.linspace(0.5, 2.0, IN, dtype=torch.float64)
    return (torch.randn(BATCH, IN, generator=gen, dtype=torch.float64) * spread).to(dtype)


def target_of(x: torch.Tensor) -> torch.Tensor:
    """What the model should output for ``x``: a fixed linear map of it."""
    gen = torch.Generator().manual_seed(7)
    return x @ torch.randn(OUT, IN, generator=gen, dtype=torch.float64).to(x.dtype).T


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Squared distance of the output to the target."""
    return (model(x) - target_of(x)).square().mean()


def reference(dtype: torch.dtype, steps: int, dp: int, **options) -> list[torch.Tensor]:
    """Single-process SOAP on the loss averaged over the ``dp`` batches of every step
    (``options``: more SOAP keywords)."""
    model = make_model(dtype)
    opt = SOAP(model.parameters(), **OPTIONS, **options)
    for step in range(steps):
        opt.zero_grad()
        loss = sum(loss_of(model, batch(step, i, dtype)) for i in range(dp)) / dp
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def train_fsdp_tp(
    rank: int,
    world: int,
    mesh_shape: tuple[int, ...],
    dtype: torch.dtype = torch.float64,
    steps: int = 6,
    strategy: str = "auto",
    options: dict | None = None,
) -> dict:
    """FSDP2 (mesh ``(dp, tp)``) or HSDP (``(replicate, shard, tp)``) over tensor parallel.

    ``options``: more SOAP keywords.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    names = ("dp", "tp") if len(mesh_shape) == 2 else ("replicate", "shard", "tp")
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = make_model(dtype)
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model, mesh=mesh[names[:-1]])
    opt = SOAP(model.parameters(), strategy=strategy, **OPTIONS, **(options or {}))
    tp = mesh_shape[-1]
    dp_index = rank // tp  # the mesh is row-major: ranks of one dp coordinate are adjacent
    sent = []
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, batch(step, dp_index, dtype)).backward()
        opt.step()
        sent.append(dict(opt.comm_stats["last_step_bytes"]))
    placements = [str(tuple(p.placements)) for p in model.parameters()]
    full = [p.full_tensor().detach().clone() for p in model.parameters()]
    return dict(
        params=full,
        placements=placements,
        strategy=opt.strategy.name,
        held=sum(1 for p in model.parameters() if opt.state[p]),
        bytes_per_step=sent,
        split=sorted(getattr(opt.strategy, "split", ())),
        direct=sorted(getattr(opt.strategy, "direct", ())),
        owners=getattr(opt.strategy, "split", {}),
    )
