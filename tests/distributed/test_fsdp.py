"""FSDP2, HSDP and FSDP1 against single-process SOAP (gloo on CPU).

Lossless strategies: 1e-10 relative after 20 steps in fp64 (docs/algorithm.md), every rank's full
parameters equal. bf16 compute is compared with the fp32 run at a measured tolerance.
"""

import pytest
import torch

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.fsdp_scenarios import FSDP_SHAPES, train_fsdp1, train_fsdp2
from tests.distributed.scenarios import single_process_reference
from tests.problems import relative_difference

STEPS = 20
FP64 = 1e-10


def _reference(world, dtype=torch.float64, steps=STEPS, skips="global"):
    return single_process_reference(dtype, world, steps, FSDP_SHAPES, skips)


def _check(results, reference, tolerance):
    for rank, result in enumerate(results):
        assert relative_difference(result["params"], reference) < tolerance, rank


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fsdp2_lossless_matches_single_process(world):
    results = run_ranks(train_fsdp2, world)
    _check(results, _reference(world), FP64)
    # each block that ever had a gradient (all but the unused one) has state on one rank only
    held = [r["held"] for r in results]
    assert sum(len(h) for h in held) == len(set().union(*held)) == len(FSDP_SHAPES)
    owners = results[0]["owners"]
    for rank, h in enumerate(held):
        assert len(h) <= owners.count(rank)


def test_fsdp2_fp32_and_no_reshard_after_forward():
    results = run_ranks(
        train_fsdp2,
        2,
        strategy="fsdp2",
        dtype=torch.float32,
        steps=STEPS,
        reshard_after_forward=False,
    )
    _check(results, _reference(2, torch.float32), 1e-4)  # fp32 tolerance of docs/algorithm.md


def test_fsdp2_gradient_accumulation():
    results = run_ranks(
        train_fsdp2, 2, strategy="fsdp2", dtype=torch.float64, steps=8, accumulate=2
    )
    _check(results, _reference(2, steps=8), FP64)


def test_hsdp_matches_single_process_and_computes_each_block_once():
    results = run_ranks(
        train_fsdp2, 4, strategy="fsdp2", dtype=torch.float64, steps=STEPS, mesh_shape=(2, 2)
    )
    _check(results, _reference(4), FP64)
    held = [r["held"] for r in results]
    assert sum(len(h) for h in held) == len(set().union(*held))  # no block on two ranks
    assert all(held)  # owners on both replica groups


def test_fsdp2_bf16_compute_close_to_fp32():
    results = run_ranks(
        train_fsdp2, 2, strategy="fsdp2", dtype=torch.float32, steps=STEPS, bf16_compute=True
    )
    reference = _reference(2, torch.float32)
    # bf16 forward/backward (reduce in fp32) perturbs every gradient by ~2^-8 relative; over
    # 20 steps that moved the parameters 5.6e-3 (measured) from the fp32 run: bound at ~5x
    difference = relative_difference(results[0]["params"], reference)
    assert difference < 3e-2


def test_fsdp2_local_mode_trains_without_communication():
    results = run_ranks(train_fsdp2, 2, "fsdp2_local")
    lossless = _reference(2)
    difference = relative_difference(results[0]["params"], lossless)
    # an approximation (preconditioning 2 row blocks separately): 0.17 measured on this small
    # problem; it must differ from lossless and still have trained the same way roughly
    assert 1e-6 < difference < 0.5
    # nothing but one float per rank, so every rank learns if another must stop on a fault
    for r in results:
        for sent in r["bytes_per_step"]:
            assert set(sent) == {"fault_check"} and sent["fault_check"] <= 8


def test_fsdp1_matches_single_process():
    results = run_ranks(train_fsdp1, 2)
    _check(results, _reference(2, skips="none"), FP64)
    assert all(r["held"] for r in results)


def test_fsdp2_staggered_refreshes_match_single_process():
    staggered = {"refresh_schedule": "staggered"}
    results = run_ranks(
        train_fsdp2,
        2,
        strategy="fsdp2",
        dtype=torch.float64,
        steps=STEPS,
        soap_kwargs=staggered,
    )
    reference = single_process_reference(
        torch.float64, 2, STEPS, FSDP_SHAPES, "global", soap_kwargs=staggered
    )
    _check(results, reference, FP64)
