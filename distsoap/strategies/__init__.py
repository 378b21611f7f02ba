"""Strategies: who computes which block, and how gradients get there and updates get back.

Every strategy derives from :class:`~distsoap.strategies.base.Strategy` and knows the optimizer
only through its :class:`~distsoap.engine.block_engine.BlockEngine`. One small module per
parallelism, picked in one place (:func:`make_strategy`):

- ``single`` (:mod:`.single`): every block on this process; no communication.
- ``ddp`` (:mod:`.data_parallel`, mode A): replicated parameters whose gradients are already
  averaged (a DistributedDataParallel model). Each block has one owner rank that stores its state
  and computes its update; updates are all-gathered.
- ``zero2`` (:mod:`.data_parallel` with :mod:`.grad_sync`, mode B): replicated parameters and no
  DDP wrapper. distsoap sends each owner the gradients it needs during backward, then
  all-gathers updates; the bytes equal DDP's all-reduce.
- ``fsdp2`` (:mod:`.sharded`): DTensor parameters (FSDP2, HSDP). Lossless: gradient pieces go to
  each block's owner, which steps the whole matrix and sends the update pieces back.
- ``fsdp2_local`` (:mod:`.sharded`): SOAP on each rank's local shards; approximate.
- ``fsdp1`` (:mod:`.sharded`): FSDP1 with ``use_orig_params=True``; lossless like ``fsdp2``, the
  pieces read from FSDP's flat-parameter metadata (pass ``fsdp_model=``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from distsoap.strategies.base import Strategy

if TYPE_CHECKING:
    from distsoap.engine.block_engine import BlockEngine

__all__ = ["COMM_DTYPES", "STRATEGIES", "Strategy", "make_strategy", "resolve_strategy_name"]

STRATEGIES = ("auto", "single", "ddp", "zero2", "fsdp2", "fsdp2_local", "fsdp1")
COMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def has_dtensor_params(params: list[torch.Tensor]) -> bool:
    """Whether any trainable parameter is a DTensor (FSDP2, HSDP)."""
    return any(p.requires_grad and hasattr(p, "device_mesh") for p in params)


def resolve_strategy_name(
    name: str, group: dist.ProcessGroup | None, params: list[torch.Tensor] = ()
) -> str:
    """Resolve ``auto`` and check the strategy can run here.

    ``auto`` is ``fsdp2`` for DTensor parameters, ``ddp`` when a process group of more than one
    rank is up, else ``single``.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    distributed = dist.is_available() and dist.is_initialized()
    if name == "auto":
        if has_dtensor_params(params):
            return "fsdp2"
        return "ddp" if distributed and dist.get_world_size(group) > 1 else "single"
    if name != "single" and not distributed:
        raise ValueError(
            f"strategy={name!r} needs torch.distributed initialised (torchrun, then "
            "init_process_group); use strategy='single' or 'auto' for one process"
        )
    return name


def mesh_group(params: list[torch.Tensor]) -> dist.ProcessGroup | None:
    """The group of the DTensor parameters' mesh, when it is smaller than the world.

    A pipeline stage's parameters live on that stage's (data / tensor parallel) sub-mesh, and
    its optimizer must communicate there only: with ``process_group=None`` SOAP takes the group
    of that mesh (its flattening, for a mesh of several dims). None when there are no DTensor
    parameters, when they span the world, or when they sit on several meshes (then
    ``process_group=`` must say which ranks SOAP shards over).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    meshes = []
    for p in params:
        mesh = getattr(p, "device_mesh", None)
        if p.requires_grad and mesh is not None and all(mesh is not m for m in meshes):
            meshes.append(mesh)
    if len({tuple(m.mesh.reshape(-1).tolist()) for m in meshes}) != 1:
        return None
    mesh = meshes[0]
    if mesh.size() == dist.get_world_size():
        return None
    return mesh.get_group() if mesh.ndim == 1 else mesh._flatten().get_group()


def make_strategy(
    engine: BlockEngine,
    name: str,
    group: dist.ProcessGroup | None,
    *,
    comm_dtype: torch.dtype | None = None,
    bucket_cap_mb: float = 25.0,
    fsdp_model: torch.nn.Module | None = None,
) -> Strategy:
    """Build the strategy ``name`` over ``engine``'s parameters (see the module docstring)."""
    from distsoap.checks.consistency import check_same_on_all_ranks
    from distsoap.sharding import dtensor_layout, fsdp1_layouts
    from distsoap.strategies.data_parallel import DataParallel
    from distsoap.strategies.sharded import LocalShards, ShardedLossless
    from distsoap.strategies.single import SingleProcess

    if comm_dtype is not None and comm_dtype not in COMM_DTYPES:
        raise ValueError(f"comm_dtype must be one of {COMM_DTYPES}, got {comm_dtype}")
    if not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    params = [p for g in engine.param_groups for p in g["params"]]
    if group is None:
        group = mesh_group(params)
    resolved = resolve_strategy_name(name, group, params)
    if dist.is_available() and dist.is_initialized():
        # every rank takes part, whatever it asked for, so a disagreement raises and never hangs
        check_same_on_all_ranks(engine, resolved, comm_dtype, group, bucket_cap_mb)
    trainable = [p for p in params if p.requires_grad]
    if resolved in ("fsdp2", "fsdp2_local"):
        plain = [i for i, p in enumerate(trainable) if not hasattr(p, "device_mesh")]
        if plain:
            raise ValueError(
                f"strategy={resolved!r} needs every trainable parameter to be a DTensor "
                f"(fully_shard the whole model); trainable parameters {plain} are not"
            )
        if resolved == "fsdp2_local":
            return LocalShards(engine, group)
        layouts = {id(p): dtensor_layout(p, group) for p in trainable}
        return ShardedLossless(engine, group, layouts, "fsdp2", comm_dtype)
    if resolved == "fsdp1":
        if fsdp_model is None:
            raise ValueError("strategy='fsdp1' needs fsdp_model= (the FSDP-wrapped model)")
        layouts = fsdp1_layouts(fsdp_model, params, group)
        return ShardedLossless(engine, group, layouts, "fsdp1", comm_dtype)
    if has_dtensor_params(trainable):
        raise ValueError(
            f"strategy={resolved!r} does not handle DTensor parameters: use 'fsdp2' (lossless) "
            "or 'fsdp2_local', or leave strategy='auto'"
        )
    if resolved == "single":
        return SingleProcess(engine)
    return DataParallel(
        engine,
        group,
        sync_gradients=resolved == "zero2",
        comm_dtype=comm_dtype,
        bucket_cap_mb=bucket_cap_mb,
    )
