"""Joining the process group in a way that survives torchrun restarts, and leaving it cleanly.

Under torchrun the workers of every restart attempt meet in the same store (the elastic agent's,
``TORCHELASTIC_USE_AGENT_STORE``). ``init_process_group`` writes its rendezvous keys there
under the same names in every attempt, so a restarted worker can read a key its dead
predecessor left and try to connect to a port that no longer listens: gloo then fails
("Connection refused") or waits until its timeout. Seen here with torch 2.13, gloo on CPU,
``torchrun --standalone --max-restarts=1`` after a SIGKILL: roughly half of the restarts.
:func:`init_distributed` prefixes the store with the attempt number.
"""

from __future__ import annotations

import gc
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


def release_process_groups() -> None:
    """Tear the process groups down cleanly, once every rank is done with them.

    Objects in reference cycles (an optimizer and its strategy) can keep process groups and
    their pending gloo work alive until the interpreter shuts down; destroyed that late, gloo
    sometimes aborts the process ("terminate called without an active exception", seen here
    with torch 2.13 on CPU). Collect them first, then barrier (an early exit can abort a peer
    still in a collective), then destroy.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()
