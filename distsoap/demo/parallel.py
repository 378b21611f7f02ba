"""How the demo wraps its model for each distributed strategy (DDP, FSDP2, HSDP)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distsoap.demo.model import GPT

# demo --strategy -> the SOAP strategy it runs
SOAP_STRATEGY = {
    "single": "single",
    "ddp": "ddp",
    "zero2": "zero2",
    "fsdp2": "fsdp2",
    "hsdp": "fsdp2",
    "fsdp2_local": "fsdp2_local",
    "deepspeed": "auto",  # DeepSpeed's ZeRO stage decides (distsoap.integrations.deepspeed)
}


def wrap_model(model: GPT, strategy: str, optimizer: str, device: torch.device):
    """Return the module to call for forward/backward under ``strategy``.

    ``ddp``: DistributedDataParallel (AdamW always gets DDP under ``zero2`` too, which needs no
    wrapper for SOAP). ``fsdp2`` / ``fsdp2_local``: ``fully_shard`` on every transformer block
    and the root over a 1-D mesh. ``hsdp``: the same over a 2-D ``(replicate, shard)`` mesh of
    shape ``(2, world // 2)``. The model is changed in place for the FSDP strategies (its
    parameters become DTensors), for SOAP and AdamW alike.
    """
    if strategy in ("single", "deepspeed") or not dist.is_initialized():
        return model  # DeepSpeed wraps the model itself
    if strategy in ("ddp", "zero2"):
        if strategy == "ddp" or optimizer == "adamw":
            return DistributedDataParallel(model)
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if strategy == "hsdp":
        if world % 2:
            raise ValueError(f"--strategy hsdp needs an even number of processes, got {world}")
        mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
