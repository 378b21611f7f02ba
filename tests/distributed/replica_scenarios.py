"""What each rank runs in tests/distributed/test_replica_checks.py (importable by spawned ranks).

Silent-wrong-training cases the start-up fingerprint cannot see: rank 1 lists same-shape
parameters in another order, a model not wrapped in DDP after DCP's initialising step, a
parameter unfrozen after construction. Each function returns the error text it caught (or
``"no error"``), so the test can compare what every rank raised.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from distsoap import SOAP
from tests.distributed.fsdp_scenarios import FSDP_SHAPES
from tests.distributed.scenarios import OPTIONS, ProblemModel

SAME_SHAPE = 3
"""ProblemModel's first three blocks are (16, 16): rank 1 reverses them."""

HSDP_SHAPES = [(16, 16), (16, 16), (16, 16), (12, 12), (8,)]


def _error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _train(forward, opt: SOAP, rank: int, world: int, steps: int) -> str:
    try:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            forward(step, rank, (rank, world)).backward()
            opt.step()
    except (ValueError, RuntimeError) as error:
        return _error(error)
    return "no error"


def _reversed_on_rank1(groups: list[dict], rank: int) -> list[dict]:
    if rank == 1:
        params = groups[0]["params"]
        params[:SAME_SHAPE] = params[:SAME_SHAPE][::-1]
    return groups


def misordered(rank: int, world: int, strategy: str, dcp_init_first: bool = False) -> str:
    """ddp / zero2, rank 1 listing the same-shape blocks in reverse; two training steps."""
    model = ProblemModel(torch.float32)
    forward = model
    if strategy == "ddp":
        forward = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    groups = _reversed_on_rank1(model.param_groups(), rank)
    opt = SOAP(groups, strategy=strategy, **OPTIONS)
    if dcp_init_first:  # DCP's all-zero-gradient step, as before loading a checkpoint
        get_state_dict(model, opt)
    sent_before = opt.comm_stats["total_bytes"].get("grad_sync", 0)
    message = _train(forward, opt, rank, world, steps=2)
    sent = opt.comm_stats["total_bytes"].get("grad_sync", 0) - sent_before
    return f"{message} [gradient bytes sent by distsoap in training: {sent}]"


def unwrapped_ddp_after_dcp_init(rank: int, world: int) -> str:
    """strategy="ddp", model not DDP-wrapped, get_state_dict (its zero step) before training."""
    model = ProblemModel(torch.float32)
    opt = SOAP(model.param_groups(), strategy="ddp", **OPTIONS)
    get_state_dict(model, opt)
    return _train(model, opt, rank, world, steps=2)


def unfrozen_after_construction(rank: int, world: int, strategy: str) -> dict:
    """ProblemModel's frozen parameter made trainable after SOAP was built; one step."""
    if strategy == "fsdp2":
        model = ProblemModel(torch.float32, FSDP_SHAPES, skips="global")
    else:
        model = ProblemModel(torch.float32)
    forward = model
    if strategy == "ddp":
        forward = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = SOAP(model.param_groups(), strategy=strategy, **OPTIONS)
    model.frozen.requires_grad_(True)
    return _train(forward, opt, rank, world, steps=1)


def misordered_fsdp(rank: int, world: int, variant: str) -> str:
    """Rank 1 lists same-shape parameters in reverse under FSDP2, HSDP or FSDP1.

    ``variant``: ``"fsdp2_named"`` (named_parameters() given to SOAP), ``"fsdp2"`` (no names:
    the sharded modules give them), ``"hsdp"`` (a 2 x 2 mesh, no names), ``"fsdp1"`` (no
    names; FSDP1's model gives them), ``"hsdp_unseeded"`` (the same order, but the second
    replica group initialised differently).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    model = ProblemModel(torch.float64, HSDP_SHAPES, skips="none")
    forward, extra = model, {}
    if variant == "fsdp1":
        forward = FullyShardedDataParallel(
            model, use_orig_params=True, device_id=torch.device("cpu")
        )
        extra = {"fsdp_model": forward, "strategy": "fsdp1"}
    else:
        if variant.startswith("hsdp"):
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
            if variant == "hsdp_unseeded" and rank >= world // 2:  # second replica group
                with torch.no_grad():
                    model.blocks[0].add_(1e-3)
        else:
            mesh = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=mesh)
    if variant == "fsdp2_named":
        named = [(n, p) for n, p in model.named_parameters() if n.startswith("blocks.")]
        if rank == 1:
            named[:SAME_SHAPE] = named[:SAME_SHAPE][::-1]
        groups = [dict(params=named)]
    elif variant == "hsdp_unseeded":
        groups = [dict(params=list(model.blocks))]
    else:
        groups = _reversed_on_rank1([dict(params=list(model.blocks))], rank)
    try:
        opt = SOAP(groups, **OPTIONS, **extra)
    except ValueError as error:
        return _error(error)
    return _train(forward, opt, rank, world, steps=2)
