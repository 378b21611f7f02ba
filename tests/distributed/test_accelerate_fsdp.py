"""Accelerate's FSDP2 optimizer checkpoints (HF Trainer under FSDP2) resume exactly.

Saved at 6 steps and continued to 12 with Accelerate's own save / load functions must equal
training straight to 12, bit for bit (same world size, same strategy, same reduction order).
"""

import pytest
import torch

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.accelerate_scenarios import run

SAVE_AT, STOP = 6, 12


@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_accelerate_fsdp2_optimizer_checkpoint_resumes_exactly(state_dict_type, tmp_path):
    pytest.importorskip("accelerate")
    straight = run_ranks(
        run,
        2,
        state_dict_type=state_dict_type,
        folder=str(tmp_path),
        save_at=SAVE_AT,
        stop=STOP,
    )
    resumed = run_ranks(
        run, 2, state_dict_type=state_dict_type, folder=str(tmp_path), save_at=None, stop=STOP
    )
    for whole, again in zip(straight[0], resumed[0]):
        assert torch.equal(whole, again)
