"""A NaN on one rank: every strategy skips the block everywhere, or every rank raises."""

import pytest
import torch

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.fault_scenarios import single_process_skip, train
from tests.problems import relative_difference


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp2"])
def test_nonfinite_gradient_skipped_identically_on_every_rank(strategy):
    results = run_ranks(train, 2, strategy, "skip")
    reference = single_process_skip(2)
    for result in results:
        # fp64; the block skipped at that step on the owner, so nowhere updated
        assert relative_difference(result["params"], reference) < 1e-10
        for mine, first in zip(result["params"], results[0]["params"]):
            assert torch.equal(mine, first)
    assert sum(r["skips"] for r in results) == 1  # counted once, by the owner


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp2"])
def test_raise_mode_stops_every_rank(strategy):
    results = run_ranks(train, 2, strategy, "raise", timeout=120)
    assert all("error" in r for r in results)
    assert sum("non-finite gradient" in r["error"] for r in results) == 1  # the owner's message
