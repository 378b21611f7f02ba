"""Joining the process group in a way that survives torchrun restarts.

Under torchrun the workers of every restart attempt meet in the same store (the elastic agent's,
``TORCHELASTIC_USE_AGENT_STORE``). ``init_process_group`` writes its rendezvous keys there
under the same names in every attempt, so a restarted worker can read a key its dead
predecessor left and try to connect to a port that no longer listens: gloo then fails
("Connection refused") or waits until its timeout. Seen here with torch 2.13, gloo on CPU,
``torchrun --standalone --max-restarts=1`` after a SIGKILL: roughly half of the restarts.
:func:`init_distributed` prefixes the store with the attempt number.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist


def init_distributed(backend: str, timeout: timedelta | None = None) -> None:
    """``dist.init_process_group(backend)``, with keys kept apart per torchrun restart attempt.

    Outside torchrun's agent store (plain env:// or mpirun setups) it is the usual call.

    Args:
        backend: ``"nccl"`` or ``"gloo"``.
        timeout: collective timeout (torch's default when None).
    """
    kwargs = {} if timeout is None else {"timeout": timeout}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, **kwargs)
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout or timedelta(minutes=10),
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"distsoap/attempt_{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        **kwargs,
    )
