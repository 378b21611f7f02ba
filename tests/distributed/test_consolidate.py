"""consolidate_state_dict: rank 0's state dict alone resumes a sharded run bit for bit."""

import pytest
import torch

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.consolidate_scenarios import run

SAVE_AT, STOP = 5, 10  # a refresh (precondition_frequency 5) on each side of the save


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp2", "fsdp2_local"])
def test_rank0_state_dict_after_consolidation_resumes_exactly(strategy, tmp_path):
    straight = run_ranks(
        run, 2, strategy=strategy, folder=str(tmp_path), save_at=SAVE_AT, stop=STOP
    )
    resumed = run_ranks(run, 2, strategy=strategy, folder=str(tmp_path), save_at=None, stop=STOP)
    # same world size, strategy and reduction order: the same bits
    for whole, again in zip(straight[0]["params"], resumed[0]["params"]):
        assert torch.equal(whole, again)
    keys = straight[0]["keys_after"]
    # rank 0 held a share before gathering, every rank's after, and its share again after a
    # step; the other rank's state dict never changes
    assert straight[0]["keys_before"] + straight[1]["keys_before"] == keys
    assert straight[0]["keys_at_end"] == straight[0]["keys_before"]
    assert straight[1]["keys_after"] == straight[1]["keys_before"]
