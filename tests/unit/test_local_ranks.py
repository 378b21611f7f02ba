"""run_ranks (distsoap/testing/local_ranks.py) hands each rank its positional and keyword arguments.

Two gloo processes per call, forked from run_ranks' fork server: the functions they run are
module-level so they import.
"""

import sys

import torch

from distsoap.testing.local_ranks import preload, run_ranks


def echo(rank: int, world: int, *args, **kwargs) -> dict:
    return {"rank": rank, "world": world, "args": args, "kwargs": kwargs}


def threads_and_kwargs(rank: int, world: int, **kwargs) -> dict:
    return {"threads": torch.get_num_threads(), "kwargs": kwargs}


def test_keyword_arguments_reach_every_rank_by_name():
    results = run_ranks(echo, 2, "first", 2.5, steps=3, dtype=torch.float64, shapes=[(4, 4)])
    assert results == [
        {
            "rank": rank,
            "world": 2,
            "args": ("first", 2.5),
            "kwargs": {"steps": 3, "dtype": torch.float64, "shapes": [(4, 4)]},
        }
        for rank in range(2)
    ]


def test_timeout_and_threads_stay_with_run_ranks():
    results = run_ranks(threads_and_kwargs, 2, timeout=120, threads=1, strategy="ddp")
    assert results == [{"threads": 1, "kwargs": {"strategy": "ddp"}}] * 2


def modules_at_entry(rank: int, world: int, names: list[str]) -> list[bool]:
    return [name in sys.modules for name in names]


def test_ranks_start_with_the_preloaded_modules():
    # forked from the fork server that imported them once: a rank finds them already there
    names = ["torch._dynamo", "distsoap.testing.no_such_module"]
    preload(names[1])  # cannot import: left out, as multiprocessing leaves it
    assert run_ranks(modules_at_entry, 2, names) == [[True, False]] * 2
