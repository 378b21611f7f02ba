"""distsoap.cluster.mpi: who a process is under mpirun."""

import os

from distsoap.cluster.mpi import MPIIdentity, mpi_identity


def test_mpi_identity_from_launcher_variables(monkeypatch):
    """Open MPI's and PMI's variables name rank, size and local rank; none means no MPI."""
    for name in list(os.environ):
        if name.startswith(("OMPI_COMM_WORLD_", "PMI_", "PMIX_", "MPI_LOCALRANKID")):
            monkeypatch.delenv(name)
    assert mpi_identity() is None
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("PMI_SIZE", "8")
    monkeypatch.setenv("MPI_LOCALRANKID", "1")
    assert mpi_identity() == MPIIdentity(rank=3, size=8, local_rank=1)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "5")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "6")
    assert mpi_identity() == MPIIdentity(rank=5, size=6, local_rank=0)  # Open MPI's first
