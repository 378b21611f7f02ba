"""DeepSpeed ZeRO stages 0-3 against single-process SOAP (2 ranks, gloo on CPU).

DeepSpeed 0.19.8 on CPU runs fp32 and bf16; fp16 too once the tests lift its CPU accelerator's
oneDNN gate (``allow_cpu_fp16`` in tests/distributed/deepspeed_scenarios.py). fp32 runs must
match single-process SOAP on the full batch within 1e-4 relative after 20 steps (the issue's and
docs/algorithm.md's fp32 tolerance: same math, different reduction order). bf16 and fp16 runs
(low-precision model, fp32 master weights and SOAP state) are compared with the fp32 reference at
a measured bound.
"""

import pytest
import torch

pytest.importorskip("deepspeed")

from distsoap.testing.local_ranks import run_ranks  # noqa: E402
from tests.distributed.deepspeed_scenarios import (  # noqa: E402
    DS_SHAPES,
    clipped_reference,
    ds_config,
    gpt_stage3,
    save_and_resume,
    state_balance,
    train_deepspeed,
)
from tests.distributed.scenarios import single_process_reference  # noqa: E402
from tests.problems import relative_difference  # noqa: E402

STEPS = 20
FP32 = 1e-4  # same math, fp32 sums in another order (docs/algorithm.md "Tolerances")
# bf16 / fp16 model weights and forward/backward against the fp32 run: measured 1.9e-2 (bf16)
# and 1.5e-2 (fp16) relative at 20 steps for every stage and wrapper (the parameters move 0.7
# relative meanwhile)
LOW = 3e-2
TIMEOUT = 600  # DeepSpeed builds its CPU comm op on a cold extension cache (~50 s)


def _reference(world=2, steps=STEPS, dtype=torch.float32):
    return single_process_reference(dtype, world, steps, DS_SHAPES, "none")


def _run(config, steps=STEPS, **kwargs):
    return run_ranks(train_deepspeed, 2, config=config, steps=steps, timeout=TIMEOUT, **kwargs)


STRATEGY = {0: "ddp", 1: "deepspeed_zero1", 2: "deepspeed_zero2", 3: "deepspeed_zero3"}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_matches_single_process(stage):
    results = _run(ds_config(stage))
    reference = _reference()
    for result in results:
        assert result["strategy"] == STRATEGY[stage]
        assert relative_difference(result["params"], reference) < FP32
        assert relative_difference(result["master"], reference) < FP32
    # each block's state on one rank: both ranks hold some, neither holds everything
    assert all(r["state_bytes"] > 0 for r in results)
    # byte counts per training step, though DeepSpeed calls step() once per group (stages
    # 1, 2): every step sends the same payload sizes, so the total is STEPS x the last step
    for result in results:
        stats = result["comm_stats"]
        assert stats["steps"] == STEPS
        assert stats["last_step_bytes"] and all(
            total == STEPS * stats["last_step_bytes"][kind]
            for kind, total in stats["total_bytes"].items()
        )


LOW_PRECISION = [("bf16", 0), ("bf16", 1), ("bf16", 2), ("bf16", 3)]
LOW_PRECISION += [("fp16", 0), ("fp16", 2), ("fp16", 3)]


@pytest.mark.parametrize("precision,stage", LOW_PRECISION)
def test_low_precision_close_to_fp32_single_process(precision, stage):
    results = _run(ds_config(stage, precision))
    reference = _reference()
    for result in results:
        assert result["strategy"] == STRATEGY[stage]
        assert result["skipped_steps"] == 0
        assert relative_difference(result["params"], reference) < LOW
    # and the two ranks agree exactly: one owner computed each update
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)


def test_bf16_optimizer_with_fp32_gradient_accumulation():
    """bf16 + stage 1 + fp32 gradient accumulation selects DeepSpeed's BF16_Optimizer."""
    config = ds_config(1, "bf16", extra={"data_types": {"grad_accum_dtype": "fp32"}})
    results = _run(config)
    assert results[0]["wrapper"] == "BF16_Optimizer"
    for result in results:
        assert relative_difference(result["params"], _reference()) < LOW


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_gradient_accumulation(stage):
    results = _run(ds_config(stage, accumulate=2), steps=10)
    reference = _reference(world=4, steps=10)  # 2 ranks x 2 micro-batches = 4 shards
    for result in results:
        assert relative_difference(result["params"], reference) < FP32


@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_clipping(stage):
    max_norm = 0.5  # the problem's gradient norms are ~2-20: every step is clipped
    results = _run(ds_config(stage, clip=max_norm), steps=10)
    reference = clipped_reference(2, max_norm, 10)
    unclipped = _reference(steps=10)
    for result in results:
        assert relative_difference(result["params"], reference) < FP32
        assert relative_difference(result["params"], unclipped) > 1e-2  # clipping did act


@pytest.mark.parametrize("entry", ["plain", "client"])
def test_plain_deepspeed_initialize_and_client_optimizer(entry):
    """``deepspeed.initialize`` after importing the integration; a SOAP object as optimizer."""
    results = run_ranks(
        train_deepspeed, 2, config=ds_config(2), steps=STEPS, entry=entry, timeout=TIMEOUT
    )
    for result in results:
        assert result["strategy"] == "deepspeed_zero2"
        assert relative_difference(result["params"], _reference()) < FP32


@pytest.mark.parametrize("precision,stage", [("fp16", 0), ("fp16", 2), ("fp16", 3), ("bf16", 2)])
def test_overflow_skips_the_step_and_keeps_the_state(precision, stage):
    """An inf loss: DeepSpeed's overflow check skips the step; SOAP's state is untouched.

    fp16: the dynamic loss scaler; bf16: ``check_grad_overflow``.
    """
    config = ds_config(stage, precision)
    if precision == "bf16":
        config["bf16"]["check_grad_overflow"] = True
    results = run_ranks(
        train_deepspeed,
        2,
        config=config,
        steps=8,
        entry="wrapper",
        inf_at_step=5,
        timeout=TIMEOUT,
    )
    for result in results:
        assert result["skipped_steps"] == 1
        assert result["state_unchanged"]
        assert all(torch.isfinite(p).all() for p in result["params"])


CHECKPOINTED = [("fp32", 0), ("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16", 2), ("fp16", 0)]


@pytest.mark.parametrize("precision,stage", CHECKPOINTED)
def test_checkpoint_continuation_is_bit_identical(precision, stage, tmp_path):
    """save_checkpoint mid-run; a fresh engine loads it and continues exactly as the first."""
    config = ds_config(stage, precision)
    results = run_ranks(
        save_and_resume, 2, config=config, steps=12, split=6, path=str(tmp_path), timeout=TIMEOUT
    )
    for result in results:
        for a, b in zip(result["straight"], result["resumed"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [2, 3])
def test_state_balanced_over_ranks(stage):
    """Many blocks: the largest rank holds <= 1.1 x an even share of the SOAP state."""
    results = run_ranks(state_balance, 2, stage, timeout=TIMEOUT)
    total = sum(r["state_bytes"] for r in results)
    assert max(r["state_bytes"] for r in results) <= 1.1 * total / 2


def test_zero3_model_built_under_zero_init():
    """HF's ZeRO-3 path: parameters partitioned at creation; SOAP still sees whole matrices."""
    built_under_init = run_ranks(gpt_stage3, 2, zero_init=True, steps=8, timeout=TIMEOUT)
    plain = run_ranks(gpt_stage3, 2, zero_init=False, steps=8, timeout=TIMEOUT)
    moved = run_ranks(gpt_stage3, 2, zero_init=False, steps=0, timeout=TIMEOUT)
    for a, b in zip(built_under_init[0], plain[0]):
        assert torch.equal(a, b)
    assert any(not torch.equal(b, c) for b, c in zip(plain[0], moved[0]))  # training moved them
