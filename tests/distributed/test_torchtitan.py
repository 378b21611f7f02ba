"""torchtitan selects SOAP by name, and resumes it from its checkpoints, at any (dp, tp) split.

The container, its FQN-keyed state dict and its zero-gradient ``init_optim_state`` step are
torchtitan's own (tests/distributed/torchtitan_scenarios.py); the reference is single-process
SOAP on the same data.
"""

import pytest
import torch

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.torchtitan_scenarios import save_and_resume
from tests.distributed.tp_scenarios import reference

pytest.importorskip("torchtitan")  # installed by the dev setup (scripts/setup_env.sh)


def test_torchtitan_container_trains_saves_and_resumes_soap(tmp_path):
    by_rank = run_ranks(
        save_and_resume, 4, checkpoint=str(tmp_path / "step_3"), resume_meshes=[(2, 2), (4, 1)]
    )
    want = reference(torch.float64, 6, 2)
    for rank, result in enumerate(by_rank):
        assert result["optimizer_type"] == "SOAP"
        assert result["init_step_untouched"], rank  # torchtitan's init step changes nothing
        # fp64: only summation order separates FSDP2 x TP from one process
        for got, wanted in zip(result["uninterrupted"], want, strict=True):
            torch.testing.assert_close(got, wanted, rtol=1e-10, atol=1e-10)
        same_split, other_split = result["resumed"]
        for got, uninterrupted in zip(same_split, result["uninterrupted"], strict=True):
            assert torch.equal(got, uninterrupted), rank  # same layout: bit for bit
        for got, wanted in zip(other_split, want, strict=True):  # (4, 1): it continues exactly
            torch.testing.assert_close(got, wanted, rtol=1e-10, atol=1e-10)
