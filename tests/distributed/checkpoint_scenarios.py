"""Save with torch.distributed.checkpoint at one world size, load at another, keep training.

Every rank builds the same model (tests/distributed/scenarios.py's ProblemModel, fp64, shapes
whose batches split evenly over 1 to 4 ranks), wraps it for the strategy, and either trains
``[0, stop)`` and saves, or loads and trains ``[start, stop)``.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel

from distsoap import SOAP
from distsoap.checkpointing.state_dict import load_optimizer_state_dict, optimizer_state_dict
from tests.distributed.scenarios import OPTIONS, ProblemModel

# every max dim a multiple of 12, so 16 x max rows split evenly over 1, 2, 3 and 4 ranks
CKPT_SHAPES = [(24, 24), (12, 12), (12, 12), (6, 6, 3, 3), (12, 36), (24,), (12,)]


def _wrap(model: nn.Module, strategy: str, world: int):
    if strategy == "fsdp1":
        wrapped = FullyShardedDataParallel(
            model, use_orig_params=True, device_id=torch.device("cpu")
        )
        return wrapped, "fsdp1"
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True), "ddp"
    if strategy in ("fsdp2", "fsdp2_local", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if strategy == "hsdp":
            mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=mesh)
        return model, "fsdp2" if strategy == "hsdp" else strategy
    return model, strategy


def run(
    rank: int,
    world: int,
    strategy: str,
    save_to: str | None,
    load_from: str | None,
    start: int,
    stop: int,
    skips: str = "global",
) -> list[torch.Tensor]:
    """Optionally load ``load_from``, train steps ``[start, stop)``, optionally save ``save_to``."""
    model = ProblemModel(torch.float64, CKPT_SHAPES, skips=skips)
    forward, soap_strategy = _wrap(model, strategy, world)
    extra = {"fsdp_model": forward} if strategy == "fsdp1" else {}
    opt = SOAP(model.param_groups(), strategy=soap_strategy, **OPTIONS, **extra)
    if load_from is not None:
        model_sd, optim_sd = _state_dicts(forward, opt, strategy)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=load_from)
        if strategy == "fsdp1":
            set_model_state_dict(forward, model_sd)
            load_optimizer_state_dict(forward, opt, optim_sd)
        else:
            set_state_dict(forward, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for step in range(start, stop):
        for group in opt.param_groups:  # a schedule: decay must use the lr of this step
            group["lr"] = OPTIONS["lr"] * 0.9**step
        opt.zero_grad(set_to_none=True)
        forward(step, rank, (rank, world)).backward()
        opt.step()
    if save_to is not None:
        model_sd, optim_sd = _state_dicts(forward, opt, strategy)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=save_to)
    if strategy == "fsdp1":
        with FullyShardedDataParallel.summon_full_params(forward):
            return [p.detach().clone() for p in model.parameters()]
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for p in model.parameters()
    ]


def _state_dicts(model: nn.Module, opt: SOAP, strategy: str):
    """torch's get_state_dict; for FSDP1 its model half and distsoap's optimizer half."""
    if strategy == "fsdp1":
        return get_model_state_dict(model), optimizer_state_dict(model, opt)
    return get_state_dict(model, opt)
