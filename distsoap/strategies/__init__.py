"""Strategies: who computes which block, and how gradients get there and updates get back.

One small module per parallelism, picked in one place (:func:`make_strategy`):

- ``single`` (:mod:`.single`): every block on this process; no communication.
- ``ddp`` (:mod:`.data_parallel`, mode A): replicated parameters whose gradients are already
  averaged (a DistributedDataParallel model). Each block has one owner rank that stores its state
  and computes its update; updates are all-gathered.
- ``zero2`` (:mod:`.data_parallel` with :mod:`.grad_sync`, mode B): replicated parameters and no
  DDP wrapper. distsoap sends each owner the gradients it needs during backward, then
  all-gathers updates; the bytes equal DDP's all-reduce.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from distsoap.comm import CommStats

if TYPE_CHECKING:
    from distsoap.optimizer import SOAP

STRATEGIES = ("auto", "single", "ddp", "zero2")
COMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Strategy(Protocol):
    """What the optimizer asks of a strategy."""

    name: str
    stats: CommStats

    def step(self) -> None:
        """Update every parameter that has a gradient."""

    def no_sync(self) -> AbstractContextManager:
        """Context for accumulation micro-batches."""

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the synchronised gradients; return their total norm."""

    def param_groups_changed(self) -> None:
        """React to ``add_param_group`` after construction."""


def resolve_strategy_name(name: str, group: dist.ProcessGroup | None) -> str:
    """``auto`` is ``ddp`` when a process group of more than one rank is up, else ``single``."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    distributed = dist.is_available() and dist.is_initialized()
    if name == "auto":
        return "ddp" if distributed and dist.get_world_size(group) > 1 else "single"
    if name in ("ddp", "zero2") and not distributed:
        raise ValueError(
            f"strategy={name!r} needs torch.distributed initialised (torchrun, then "
            "init_process_group); use strategy='single' or 'auto' for one process"
        )
    return name


def make_strategy(
    optimizer: SOAP,
    name: str,
    group: dist.ProcessGroup | None,
    *,
    comm_dtype: torch.dtype | None = None,
    bucket_cap_mb: float = 25.0,
) -> Strategy:
    """Build the strategy ``name`` for ``optimizer`` (see the module docstring)."""
    from distsoap.consistency import check_same_on_all_ranks
    from distsoap.strategies.data_parallel import DataParallel
    from distsoap.strategies.single import SingleProcess

    if comm_dtype is not None and comm_dtype not in COMM_DTYPES:
        raise ValueError(f"comm_dtype must be one of {COMM_DTYPES}, got {comm_dtype}")
    if not bucket_cap_mb > 0:
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
    resolved = resolve_strategy_name(name, group)
    if dist.is_available() and dist.is_initialized():
        # every rank takes part, whatever it asked for, so a disagreement raises and never hangs
        check_same_on_all_ranks(optimizer, resolved, comm_dtype, group)
    if resolved == "single":
        return SingleProcess(optimizer)
    return DataParallel(
        optimizer,
        group,
        sync_gradients=resolved == "zero2",
        comm_dtype=comm_dtype,
        bucket_cap_mb=bucket_cap_mb,
    )
