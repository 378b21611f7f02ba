"""Start-up check that every rank built the same optimizer, so no collective can hang."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from distsoap.hyperparams import hyperparameter_text

if TYPE_CHECKING:
    from distsoap.optimizer import SOAP


def optimizer_fingerprint(
    optimizer: SOAP, strategy: str, comm_dtype: torch.dtype | None, bucket_cap_mb: float = 25.0
) -> int:
    """A 63-bit hash of what must agree across ranks.

    Covers the strategy, communication dtype and bucket size (both shape the collectives), every
    parameter's shape, dtype and requires_grad,
    and every param group's hyperparameters. Under FSDP1 the optimizer sees each rank's local
    1-D piece, whose shape differs between ranks by design, so shapes are left out there (the
    full shapes are compared when FSDP's metadata is gathered).
    """
    local_pieces = strategy == "fsdp1"
    parts: list[str] = [
        strategy,
        str(comm_dtype),
        repr(float(bucket_cap_mb)),
        optimizer.data_format,
        str(optimizer.moment_dtype),
    ]
    for group in optimizer.param_groups:
        hyper = sorted((k, hyperparameter_text(v)) for k, v in group.items() if k != "params")
        parts.append(repr(hyper))
        parts.extend(
            f"{'' if local_pieces else tuple(p.shape)}:{p.dtype}:{p.requires_grad}"
            for p in group["params"]
        )
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_same_on_all_ranks(
    optimizer: SOAP,
    strategy: str,
    comm_dtype: torch.dtype | None,
    group: dist.ProcessGroup | None,
    bucket_cap_mb: float = 25.0,
) -> None:
    """Raise the same ValueError on every rank unless all ranks built the same optimizer.

    One all-gather of one integer per rank: it completes whatever the ranks disagree on.
    """
    mine = optimizer_fingerprint(optimizer, strategy, comm_dtype, bucket_cap_mb)
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    gathered = [
        torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))
    ]
    dist.all_gather(gathered, torch.tensor([mine], dtype=torch.int64, device=device), group=group)
    values = [int(t.item()) for t in gathered]
    if len(set(values)) > 1:
        differing = [r for r, v in enumerate(values) if v != values[0]]
        raise ValueError(
            "SOAP was built differently on different ranks (parameter lists, shapes, dtypes, "
            "param-group hyperparameters, strategy, comm_dtype or bucket_cap_mb differ): ranks "
            f"{differing} disagree with rank 0. Build the model and optimizer identically on "
            "every rank."
        )
