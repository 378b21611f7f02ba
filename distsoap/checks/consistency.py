"""Start-up check that every rank built the same optimizer, so no collective can hang."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from distsoap.checks.fsdp2_names import fsdp2_parameter_names
from distsoap.hyperparams import hyperparameter_text

if TYPE_CHECKING:
    from distsoap.engine.block_engine import BlockEngine

_NOT_HYPER = ("params", "param_names")


def optimizer_fingerprint(
    engine: BlockEngine, strategy: str, comm_dtype: torch.dtype | None, bucket_cap_mb: float = 25.0
) -> int:
    """A 63-bit hash of what must agree across ranks.

    Covers the strategy, communication dtype and bucket size (both shape the collectives), the
    storage options and ``split_blocks`` (placement depends on it), every parameter's shape,
    dtype and requires_grad, and every param group's hyperparameters. Under FSDP1 the optimizer
    sees each rank's local 1-D piece, whose shape differs between ranks by design, so shapes are
    left out there (the full shapes are compared when FSDP's metadata is gathered). Parameter
    names (``param_names``, recorded by torch when the optimizer is given
    ``named_parameters()``) are left to :func:`names_fingerprint`.
    """
    local_pieces = strategy == "fsdp1"
    parts: list[str] = [
        strategy,
        str(comm_dtype),
        repr(float(bucket_cap_mb)),
        engine.data_format,
        str(engine.moment_dtype),
        str(engine.factor_dtype),
        str(engine.basis_dtype),
        repr(engine.basis_orthogonality_tol),
        engine.split_blocks,
    ]
    for group in engine.param_groups:
        hyper = sorted((k, hyperparameter_text(v)) for k, v in group.items() if k not in _NOT_HYPER)
        parts.append(repr(hyper))
        parts.extend(
            f"{'' if local_pieces else tuple(p.shape)}:{p.dtype}:{p.requires_grad}"
            for p in group["params"]
        )
    return _hash(parts)


def parameter_names(engine: BlockEngine) -> list[str] | None:
    """Every parameter's rank-independent name, in order, or None where none is known.

    ``param_names`` when the optimizer was given ``named_parameters()``; for FSDP2 parameters
    (DTensors) otherwise, the names their modules give them (:mod:`distsoap.checks.fsdp2_names`).
    """
    groups = engine.param_groups
    if any(group.get("param_names") is not None for group in groups):
        return [repr(group.get("param_names")) for group in groups]
    params = [p for group in groups for p in group["params"]]
    if not any(hasattr(p, "device_mesh") for p in params):
        return None
    found = fsdp2_parameter_names(params)
    return [found.get(id(p), "?") for p in params] if found else None


def names_fingerprint(engine: BlockEngine) -> int:
    """A 63-bit hash of :func:`parameter_names` (0 when none are known).

    Names are the only rank-independent identity of a parameter the optimizer can find: the
    same names in another order mean the ranks list parameters differently, which shapes alone
    miss when the parameters swapped have the same shape (param groups built from a ``set``).
    """
    names = parameter_names(engine)
    return 0 if names is None else _hash(names)


def _hash(parts: list[str]) -> int:
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


_DISAGREEMENTS = (
    "SOAP was built differently on different ranks (parameter lists, shapes, dtypes, "
    "param-group hyperparameters, strategy, comm_dtype or bucket_cap_mb differ): ranks "
    "{ranks} disagree with rank 0. Build the model and optimizer identically on every rank.",
    "SOAP was built differently on different ranks: the parameter names (param_names) differ "
    "(given to SOAP, or under FSDP2 those of the sharded modules), so ranks {ranks} list the "
    "parameters in another order (or under other names) than rank 0. Build the param groups in "
    "one order on every rank, e.g. from model.named_parameters() (a set has no fixed order).",
)
"""What a mismatch of each fingerprint (everything but names; names) means, in that order."""


def check_same_on_all_ranks(
    engine: BlockEngine,
    strategy: str,
    comm_dtype: torch.dtype | None,
    group: dist.ProcessGroup | None,
    bucket_cap_mb: float = 25.0,
) -> None:
    """Raise the same ValueError on every rank unless all ranks built the same optimizer.

    One all-gather of two integers per rank: it completes whatever the ranks disagree on.
    """
    mine = [
        optimizer_fingerprint(engine, strategy, comm_dtype, bucket_cap_mb),
        names_fingerprint(engine),
    ]
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    gathered = [
        torch.zeros(2, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))
    ]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.int64, device=device), group=group)
    values = [tuple(t.tolist()) for t in gathered]
    for index, explain in enumerate(_DISAGREEMENTS):  # the same text on every rank
        differing = [r for r, v in enumerate(values) if v[index] != values[0][index]]
        if differing:
            raise ValueError(explain.format(ranks=differing))
