"""The state and refresh options keep every lossless strategy equal to one process.

Each option changes the math of a block, never where it is computed, so ddp, zero2 and fsdp2 at
2 ranks must end where single-process SOAP with the same option ends (tests/distributed/
scenarios.py's mixed-shape model: square, one-sided, conv and 1-D blocks, two param groups).
DeepSpeed ZeRO-2 too, in fp32 (DeepSpeed keeps fp32 master weights), and FSDP1, at 2 ranks.
"""

from __future__ import annotations

import pytest
import torch

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.fsdp_scenarios import FSDP_SHAPES, train_fsdp1, train_fsdp2
from tests.distributed.scenarios import SHAPES, single_process_reference, train_data_parallel
from tests.problems import relative_difference

STEPS = 12
FP64, FP32 = torch.float64, torch.float32
OPTION_SETS = {
    # name: (options, dtype, tolerance)
    "one_sided": ({"one_sided": True}, FP64, 1e-10),  # fp64: summation order only
    # fp64 parameters keep fp64 state, so storage is tested in fp32: measured 0 here, but an
    # fp32 summation-order difference (1e-7) can flip one bf16 rounding (4e-3) of a factor
    # entry on another CPU; 1e-3 allows that and still sees the option (it changes 1e-2)
    "bf16_storage": ({"factor_dtype": "bf16", "basis_dtype": "bf16"}, FP32, 1e-3),
    # a tolerance above any mass: every due refresh measured, the skips decided per block on
    # its owner exactly as in one process (a tolerance near a mass could tip either way on
    # summation order, which is why the decision is compared where it is certain)
    # blocks of at most 8: (16, 16) as 2 x 2, (24, 24) as 3 x 3, (37, 37) as 5 x 5 padded to 40
    "block_size": ({"block_size": 8}, FP64, 1e-10),
    "adaptive_refresh": ({"refresh_tolerance": 1.5, "max_skipped_refreshes": 1}, FP64, 1e-10),
    # bf16 storage with blocks: under ddp and zero2 the blocks are split over both ranks
    "bf16_blocks": ({"factor_dtype": "bf16", "basis_dtype": "bf16", "block_size": 8}, FP32, 1e-3),
}


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp2"])
def test_lossless_strategies_match_single_process_with_the_option(strategy, options):
    kwargs, dtype, tolerance = OPTION_SETS[options]
    shapes, skips = (FSDP_SHAPES, "global") if strategy == "fsdp2" else (SHAPES, "per_rank")
    if strategy == "fsdp2":
        results = run_ranks(train_fsdp2, 2, dtype=dtype, steps=STEPS, soap_kwargs=kwargs)
    else:
        results = run_ranks(
            train_data_parallel, 2, strategy=strategy, dtype=dtype, steps=STEPS, soap_kwargs=kwargs
        )
    reference = single_process_reference(dtype, 2, STEPS, shapes, skips, soap_kwargs=kwargs)
    plain = single_process_reference(dtype, 2, STEPS, shapes, skips)
    changed = relative_difference(plain, reference)
    assert changed > 1e-3  # the option changes the result
    for rank, result in enumerate(results):
        assert relative_difference(result["params"], reference) < tolerance, rank


# bf16_blocks covers bf16 storage and blocks together (block_size alone: test_block_owners.py)
@pytest.mark.parametrize("options", ["one_sided", "adaptive_refresh", "bf16_blocks"])
def test_fsdp1_matches_single_process_with_the_option(options):
    """FSDP1's flat pieces (the same lossless exchange as fsdp2 on other layouts)."""
    kwargs, dtype, tolerance = OPTION_SETS[options]
    results = run_ranks(train_fsdp1, 2, steps=STEPS, dtype=dtype, soap_kwargs=kwargs)
    reference = single_process_reference(dtype, 2, STEPS, FSDP_SHAPES, "none", soap_kwargs=kwargs)
    plain = single_process_reference(dtype, 2, STEPS, FSDP_SHAPES, "none")
    assert relative_difference(plain, reference) > 1e-3  # the option changes the result
    for rank, result in enumerate(results):
        assert relative_difference(result["params"], reference) < tolerance, rank


# DeepSpeed runs fp32: same math, sums in another order (tests/distributed/test_deepspeed.py),
# and bf16 storage as above
DEEPSPEED_TOLERANCE = {"bf16_blocks": 1e-3}


# bf16_blocks covers bf16 storage and blocks together (block_size alone: test_block_owners.py)
@pytest.mark.parametrize("options", ["one_sided", "adaptive_refresh", "bf16_blocks"])
def test_deepspeed_zero2_matches_single_process_with_the_option(options):
    pytest.importorskip("deepspeed")
    from tests.distributed.deepspeed_scenarios import DS_SHAPES, ds_config, train_deepspeed

    kwargs = OPTION_SETS[options][0]
    config = ds_config(2)
    config["optimizer"]["params"].update(kwargs)
    results = run_ranks(train_deepspeed, 2, config=config, steps=STEPS, timeout=600)
    # DeepSpeed gives every parameter a gradient (a zero one if unused): no skipped blocks
    reference = single_process_reference(FP32, 2, STEPS, DS_SHAPES, "none", soap_kwargs=kwargs)
    plain = single_process_reference(FP32, 2, STEPS, DS_SHAPES, "none")
    assert relative_difference(plain, reference) > 1e-3  # the option changes the result
    tolerance = DEEPSPEED_TOLERANCE.get(options, 1e-4)
    for rank, result in enumerate(results):
        assert result["strategy"] == "deepspeed_zero2"
        assert relative_difference(result["params"], reference) < tolerance, rank
