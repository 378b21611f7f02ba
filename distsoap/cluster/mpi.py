"""Starting torch.distributed under mpirun: MPI tells each process who it is, gloo/NCCL do the rest.

``mpirun -n 8 python train.py`` starts the processes but sets none of the variables
``torch.distributed`` reads (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). :func:`mpi_identity`
reads rank, size and local rank from mpi4py, or, without it, from the launcher's variables
(Open MPI's ``OMPI_COMM_WORLD_*``, MPICH / Intel MPI / Slurm PMI's ``PMI_*``);
:func:`init_from_mpi` lets rank 0 pick its host and a free port, broadcasts them with MPI (or
takes MASTER_ADDR / MASTER_PORT from the environment when mpi4py is absent), exports the
variables and calls ``init_process_group``. The collectives themselves are gloo or NCCL (torch
builds usually have no MPI backend).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

# (rank, size, local rank) variables per MPI flavour, most specific first
_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
)


@dataclass(frozen=True)
class MPIIdentity:
    """Who this process is in the MPI job."""

    rank: int
    """Global rank."""
    size: int
    """Number of processes."""
    local_rank: int
    """Rank among the processes on this node (picks the GPU)."""


def mpi_identity() -> MPIIdentity | None:
    """Return where this process sits in an MPI job, or None outside an MPI launch."""
    for rank, size, local in _VARIABLES:
        if rank in os.environ and size in os.environ:
            return MPIIdentity(
                int(os.environ[rank]), int(os.environ[size]), int(os.environ.get(local, 0))
            )
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous(identity: MPIIdentity) -> tuple[str, int]:
    """Rank 0's host and a free port on it, known to every rank."""
    try:
        from mpi4py import MPI
    except ImportError:
        try:
            return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except KeyError:
            raise RuntimeError(
                "under mpirun without mpi4py, set MASTER_ADDR and MASTER_PORT (rank 0's host and "
                "a free port) or install mpi4py (pip install mpi4py)"
            ) from None
    chosen = (socket.gethostname(), _free_port()) if identity.rank == 0 else None
    return MPI.COMM_WORLD.bcast(chosen, root=0)


def init_from_mpi(backend: str, timeout: timedelta | None = None) -> MPIIdentity:
    """Join the process group from an MPI launch; returns this process's identity.

    Sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (an explicitly set
    MASTER_ADDR / MASTER_PORT wins), then ``init_process_group(backend)``.

    Raises:
        RuntimeError: outside an MPI launch, or when the rendezvous address cannot be found.
    """
    identity = mpi_identity()
    if identity is None:
        raise RuntimeError(
            "not started by an MPI launcher (no OMPI_COMM_WORLD_*, PMI_* or PMIX_* variables)"
        )
    address, port = _rendezvous(identity)
    os.environ.setdefault("MASTER_ADDR", address)
    os.environ.setdefault("MASTER_PORT", str(port))
    os.environ.update(
        RANK=str(identity.rank),
        WORLD_SIZE=str(identity.size),
        LOCAL_RANK=str(identity.local_rank),
    )
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, **kwargs)
    return identity
