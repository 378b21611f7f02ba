"""Resharding checkpoints: torch.distributed.checkpoint across world sizes and strategies.

Saved at 8 steps and continued to 16 must equal training straight to 16: in fp64 within 1e-10
relative across world sizes (only gradient-averaging order differs), bitwise at the same world
size and strategy.
"""

import pytest
import torch

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.checkpoint_scenarios import CKPT_SHAPES, run
from tests.distributed.scenarios import single_process_reference
from tests.problems import relative_difference

SAVE_AT, STOP = 8, 16


@pytest.fixture(scope="module")
def reference():
    return {
        skips: single_process_reference(
            torch.float64, 1, STOP, CKPT_SHAPES, skips=skips, lr_decay=0.9
        )
        for skips in ("global", "none")
    }


def _save(tmp_path, strategy, world):
    path = str(tmp_path / f"{strategy}-{world}")
    skips = "none" if strategy == "fsdp1" else "global"
    run_ranks(
        run,
        world,
        strategy=strategy,
        save_to=path,
        load_from=None,
        start=0,
        stop=SAVE_AT,
        skips=skips,
    )
    return path


def _resume(path, strategy: str, world: int, skips: str) -> list:
    """Load the checkpoint at ``path`` and train from SAVE_AT to STOP; every rank's parameters."""
    return run_ranks(
        run,
        world,
        strategy=strategy,
        save_to=None,
        load_from=path,
        start=SAVE_AT,
        stop=STOP,
        skips=skips,
    )


@pytest.mark.parametrize(
    "saved_with, loaded_with",
    [
        (("zero2", 2), ("single", 1)),
        (("zero2", 2), ("zero2", 3)),
        (("ddp", 2), ("zero2", 4)),
        (("fsdp2", 2), ("fsdp2", 3)),
        (("fsdp2", 2), ("hsdp", 4)),
        (("hsdp", 4), ("ddp", 2)),
        (("fsdp1", 2), ("zero2", 3)),
    ],
    ids=lambda c: f"{c[0]}@{c[1]}",
)
def test_checkpoint_loads_at_other_world_sizes(tmp_path, reference, saved_with, loaded_with):
    path = _save(tmp_path, *saved_with)
    strategy, world = loaded_with
    skips = "none" if "fsdp1" in (saved_with[0], strategy) else "global"
    results = _resume(path, strategy, world, skips)
    for params in results:
        assert relative_difference(params, reference[skips]) < 1e-10


@pytest.mark.parametrize("strategy", ["zero2", "fsdp2", "fsdp2_local", "fsdp1"])
def test_same_world_size_continues_bit_for_bit(tmp_path, strategy):
    skips = "none" if strategy == "fsdp1" else "global"  # FSDP1: zero grads, see test_fsdp.py
    straight = run_ranks(
        run, 2, strategy=strategy, save_to=None, load_from=None, start=0, stop=STOP, skips=skips
    )
    path = _save(tmp_path, strategy, 2)
    resumed = _resume(path, strategy, 2, skips)
    for got, want in zip(resumed, straight):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
