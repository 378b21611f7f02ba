"""What each rank runs in the FSDP2 / HSDP / FSDP1 tests (importable by spawned processes).

The model is tests/distributed/scenarios.py's ProblemModel with shapes chosen for sharding:
37 rows over up to 4 ranks (uneven: 10, 10, 10, 7), a 3 x 3 matrix (fewer rows than ranks: one
rank holds an empty shard), a conv, a one-sided matrix, 1-D parameters, a 12 x 12 matrix
sharded on dim 1, plus the frozen and the unused parameter. FSDP2 needs every rank to produce
the same set of gradients, so blocks are skipped on all ranks at once, never on one.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from distsoap import SOAP
from tests.distributed.scenarios import OPTIONS, ProblemModel

FSDP_SHAPES = [(37, 37), (16, 16), (3, 3), (8, 6, 3, 3), (12, 40), (37,), (5,), (12, 12)]
SHARD_DIM_1 = (12, 12)


def _placement(param: torch.Tensor):
    return Shard(1) if tuple(param.shape) == SHARD_DIM_1 else None


def train_fsdp2(
    rank: int,
    world: int,
    strategy: str = "fsdp2",
    dtype: torch.dtype = torch.float64,
    steps: int = 20,
    mesh_shape: tuple[int, ...] | None = None,
    reshard_after_forward: bool = True,
    accumulate: int = 1,
    bf16_compute: bool = False,
    soap_kwargs: dict | None = None,
) -> dict:
    """FSDP2 (1-D mesh) or HSDP (2-D mesh ``(replicate, shard)``) training on shards."""
    mesh_shape = mesh_shape or (world,)
    names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = ProblemModel(dtype, FSDP_SHAPES, skips="global")
    kwargs = dict(
        mesh=mesh, reshard_after_forward=reshard_after_forward, shard_placement_fn=_placement
    )
    if bf16_compute:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    fully_shard(model, **kwargs)
    opt = SOAP(model.param_groups(), strategy=strategy, **OPTIONS, **(soap_kwargs or {}))
    sent = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        for micro in range(accumulate):
            model.set_requires_gradient_sync(micro == accumulate - 1)
            shard = (rank * accumulate + micro, world * accumulate)
            (model(step, rank, shard) / accumulate).backward()
        opt.step()
        sent.append(dict(opt.comm_stats["last_step_bytes"]))
    held = {i for i, p in enumerate(model.parameters()) if len(opt.state[p]) > 0}
    state_bytes = opt.state_bytes()
    full = [p.full_tensor().detach().clone() for p in model.parameters()]
    return {
        "params": full,
        "held": held,
        "owners": list(getattr(opt.strategy, "owners", [])),
        "state_bytes": state_bytes,
        "bytes_per_step": sent,
    }


def train_fsdp1(
    rank: int,
    world: int,
    steps: int = 20,
    dtype: torch.dtype = torch.float64,
    soap_kwargs: dict | None = None,
) -> dict:
    """FSDP1 with use_orig_params=True; the optimizer reads the flat-parameter metadata."""
    # FSDP1 hands an unused parameter a zero gradient (one flat gradient per unit), not None,
    # so its step differs from single-process SOAP's skip: no skipped blocks here
    model = ProblemModel(dtype, FSDP_SHAPES, skips="none")
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    kwargs = {**OPTIONS, **(soap_kwargs or {})}
    opt = SOAP(model.param_groups(), strategy="fsdp1", fsdp_model=wrapped, **kwargs)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        wrapped(step, rank, (rank, world)).backward()
        opt.step()
    with FullyShardedDataParallel.summon_full_params(wrapped):
        full = [p.detach().clone() for p in model.parameters()]
    held = {i for i, p in enumerate(model.parameters()) if len(opt.state[p]) > 0}
    return {"params": full, "held": held}
