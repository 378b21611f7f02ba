"""One SOAP per pipeline stage, each over its stage's data-parallel ranks only.

Against single-process SOAP on the whole model (tests/distributed/pipeline_scenarios.py).
"""

import torch

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.pipeline_scenarios import train_pipeline
from tests.distributed.tp_scenarios import reference


def test_two_stages_by_two_data_parallel_ranks_equal_single_process():
    by_rank = run_ranks(train_pipeline, 4, dtype=torch.float64)
    want = reference(torch.float64, 6, 2)  # [up.weight, up.bias, down.weight, down.bias]
    for rank, result in enumerate(by_rank):
        stage = result["stage"]
        # SOAP took the stage's mesh as its group: its collectives never leave the stage
        assert result["group_ranks"] == [2 * stage, 2 * stage + 1], rank
        assert result["strategy"] == "fsdp2"
        assert result["bytes_per_step"]["update_scatter"] > 0
        expected = want[2 * stage : 2 * stage + 2]
        for got, wanted in zip(result["params"], expected, strict=True):
            # fp64: gradient averaging and piece assembly round differently, nothing more
            torch.testing.assert_close(got, wanted, rtol=1e-10, atol=1e-10)
