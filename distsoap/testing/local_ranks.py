"""Run a function on N local processes joined by gloo, and bring back what each returns.

For tests, benchmarks and quick experiments on one machine (CPU). Real jobs use torchrun.

Processes are forked from a fork server that imported torch once (``forkserver`` start method
with torch preloaded), not spawned: a spawned process spends seconds importing torch, which a
test suite of a few hundred multi-process runs pays hundreds of times. Each process still starts
from the caller's environment variables and working directory of the moment, as a spawned one
would (the fork server's own are those of its start).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distsoap.cluster.process_group import release_process_groups


def free_port() -> int:
    """A TCP port the OS says is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOADED = ["torch", "torch.distributed", "torch._dynamo"]
"""Imported once by the fork server; every process forked from it has them. ``torch._dynamo``
because ``torch.optim.Optimizer`` imports it when it adds its first parameter group (about
2.5 s, more than the rest of a small test's rank). Modules the server cannot import are left
out (multiprocessing's own rule). They are imported with the server's environment variables,
those of its start: a module that reads one at import sees that value, not the caller's."""


def preload(*modules: str) -> None:
    """Have the fork server import ``modules`` too, once, instead of every process importing them.

    Takes effect when the server starts, at the first :func:`run_ranks` of the process: call it
    before (a test suite's ``conftest.py``). A module that does not import is left out.
    """
    PRELOADED.extend(m for m in modules if m not in PRELOADED)


def _worker(
    rank: int,
    world: int,
    port: int,
    fn: Callable,
    args: tuple,
    kwargs: dict,
    out: str,
    threads: int,
    environment: dict[str, str],
    cwd: str,
) -> None:
    os.environ.clear()  # the caller's variables now, not the fork server's at its start
    os.environ.update(environment)
    os.chdir(cwd)
    torch.set_num_threads(threads)
    # the variables a launcher sets: libraries that read them (DeepSpeed) find this rank too
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = ("ok", fn(rank, world, *args, **kwargs))
    except Exception as error:  # returned to the parent, which re-raises
        result = ("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
    Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    del result
    release_process_groups()
    # the result is written and gloo is down: skip interpreter finalization, where objects
    # still holding gloo resources would be destroyed after the runtime they need
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _caller_context() -> tuple[dict[str, str], str]:
    """The environment variables and working directory a spawned process would inherit now."""
    return dict(os.environ), os.getcwd()


def run_ranks(
    fn: Callable, world: int, *args, timeout: float = 240, threads: int | None = None, **kwargs
) -> list:
    """Call ``fn(rank, world, *args, **kwargs)`` on ``world`` gloo processes; return the results.

    ``run_ranks(train, 2, strategy="ddp", steps=8)`` runs ``train(rank, 2, strategy="ddp",
    steps=8)`` on ranks 0 and 1 and returns ``[result of rank 0, result of rank 1]``.

    Args:
        fn: an importable (module-level) function; what it returns must pickle.
        world: number of processes.
        *args: passed to ``fn`` after rank and world.
        timeout: run_ranks' own, never passed to ``fn``: seconds before every process is
            killed and TimeoutError raised.
        threads: run_ranks' own, never passed to ``fn``: torch threads per process (default:
            the machine's cores shared out, >= 1).
        **kwargs: every other keyword argument, passed to ``fn`` by name; they must pickle. A
            parameter of ``fn`` named ``timeout`` or ``threads`` can only be given in ``*args``.

    Raises:
        RuntimeError: with the traceback of a rank whose ``fn`` raised.
    """
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world)
    multiprocessing.set_forkserver_preload(PRELOADED)  # takes effect when the server starts
    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(
            _worker,
            args=(world, free_port(), fn, args, kwargs, out, threads, *_caller_context()),
            nprocs=world,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout} s")
        results = []
        for rank in range(world):
            status, value = pickle.loads(Path(out, f"{rank}.pkl").read_bytes())
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
    return results
