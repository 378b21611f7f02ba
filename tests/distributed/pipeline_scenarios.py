"""What each rank runs in the pipeline-stage test (importable by spawned processes).

Four ranks on a (pp, dp) = (2, 2) mesh: stage 0 holds the MLP's first Linear, stage 1 its
second, each stage ``fully_shard``-ed over its own two data-parallel ranks, one SOAP per stage
built as torchtitan builds one per model part (``SOAP(part.parameters())``, no group given).
Activations and their gradients travel between the stages with send / recv, as a pipeline
schedule's would; one micro-batch per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distsoap import SOAP
from tests.distributed.tp_scenarios import BATCH, HIDDEN, OPTIONS, batch, make_model, target_of


def train_pipeline(rank: int, world: int, dtype: torch.dtype = torch.float64, steps: int = 6):
    """Train this rank's stage; return its full parameters and the optimizer's group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("pp", "dp"))
    stage, dp_index = divmod(rank, world // 2)
    whole = make_model(dtype)
    part = nn.Sequential(whole.up, whole.act) if stage == 0 else nn.Sequential(whole.down)
    fully_shard(part, mesh=mesh["dp"])
    opt = SOAP(part.parameters(), **OPTIONS)
    peer = rank + world // 2 if stage == 0 else rank - world // 2  # same dp index, other stage
    for step in range(steps):
        opt.zero_grad()
        x = batch(step, dp_index, dtype)
        if stage == 0:
            hidden = part(x)
            dist.send(hidden.detach().contiguous(), peer)
            grad = torch.empty_like(hidden)
            dist.recv(grad, peer)
            hidden.backward(grad)
        else:
            hidden = torch.empty(BATCH, HIDDEN, dtype=dtype)
            dist.recv(hidden, peer)
            hidden.requires_grad_()
            (part(hidden) - target_of(x)).square().mean().backward()
            dist.send(hidden.grad.contiguous(), peer)
        opt.step()
    group = opt.strategy.group
    return dict(
        stage=stage,
        params=[p.full_tensor().detach().clone() for p in part.parameters()],
        group_ranks=[dist.get_global_rank(group, r) for r in range(dist.get_world_size(group))],
        strategy=opt.strategy.name,
        bytes_per_step=dict(opt.comm_stats["last_step_bytes"]),
    )
