"""Lossless SOAP on FSDP2 over tensor parallel: whole matrices, whatever the DTensor layout.

Compared with single-process SOAP on the same data (tests/distributed/tp_scenarios.py).
"""

import pytest
import torch

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.tp_scenarios import make_model, reference, train_fsdp_tp

# fp64: only the rounding of a different summation order (assembled pieces, averaged
# gradients) separates the runs, far below 1e-10 over 6 steps with 2 refreshes.
# fp32: the same orders in single precision; the bar for well-conditioned models.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def _assert_matches(by_rank: list[dict], dtype: torch.dtype, steps: int, dp: int) -> None:
    want = reference(dtype, steps, dp)
    for result in by_rank:
        for got, expected in zip(result["params"], want, strict=True):
            torch.testing.assert_close(got, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    initial = [p.detach() for p in make_model(dtype).parameters()]
    assert max(float((w - i).abs().max()) for w, i in zip(want, initial)) > 1e-3  # it trained


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fsdp2_over_tp_2x2_equals_single_process(dtype):
    by_rank = run_ranks(train_fsdp_tp, 4, mesh_shape=(2, 2), dtype=dtype)
    placements = by_rank[0]["placements"]
    # the layouts that used to be refused: strided FSDP-over-TP rows, and two sharded dims
    assert "(_StridedShard(dim=0, sf=2), Shard(dim=0))" in placements
    assert "(Shard(dim=0), Shard(dim=1))" in placements
    assert {r["strategy"] for r in by_rank} == {"fsdp2"}
    assert sum(r["held"] for r in by_rank) == 4  # each of the 4 matrices and biases once
    assert all(r["bytes_per_step"][-1]["update_scatter"] > 0 for r in by_rank)
    _assert_matches(by_rank, dtype, steps=6, dp=2)


def test_hsdp_over_tp_2x2x2_equals_single_process():
    by_rank = run_ranks(train_fsdp_tp, 8, mesh_shape=(2, 2, 2), dtype=torch.float64, timeout=400)
    assert sum(r["held"] for r in by_rank) == 4  # one owner per parameter over all 8 ranks
    _assert_matches(by_rank, torch.float64, steps=6, dp=4)


def test_fsdp2_over_tp_split_blocks_equal_single_process():
    """Blocks of 3 (four per weight) spread over the 4 ranks: each rank's box of a weight
    (strided rows under colwise TP) goes straight to the owners of the blocks it meets, and the
    result is one process's. (The assembler's round trip, the other path, is held against one
    process under FSDP2 in test_block_owners.py; its pieces are assembled as any parameter's.)"""
    by_rank = run_ranks(train_fsdp_tp, 4, mesh_shape=(2, 2), options=dict(block_size=3))
    first = by_rank[0]
    assert len(first["split"]) == 2  # both weights split
    assert all(len({p.owner for p in pieces}) >= 2 for pieces in first["owners"].values())
    assert first["direct"] == first["split"]
    rows_sent = sum(
        step.get("grad_rows", 0) + step.get("update_rows", 0)
        for r in by_rank
        for step in r["bytes_per_step"]
    )
    assert rows_sent == 0
    want = reference(torch.float64, 6, 2, block_size=3)
    for result in by_rank:
        for got, expected in zip(result["params"], want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)  # fp64, as above
    plain = reference(torch.float64, 6, 2)
    assert max(float((w - p).abs().max()) for w, p in zip(want, plain)) > 1e-3  # blocks matter


def test_tp_local_mode_is_an_approximation_that_trains():
    """``fsdp2_local`` on FSDP2 x TP: SOAP on each rank's own piece, no extra exchange."""
    by_rank = run_ranks(train_fsdp_tp, 4, mesh_shape=(2, 2), strategy="fsdp2_local")
    assert {r["strategy"] for r in by_rank} == {"fsdp2_local"}
    assert all("update_scatter" not in step for step in by_rank[0]["bytes_per_step"])
    got, want = by_rank[0]["params"], reference(torch.float64, 6, 2)
    initial = [p.detach() for p in make_model(torch.float64).parameters()]
    assert all(bool(torch.isfinite(g).all()) for g in got)
    assert max(float((g - i).abs().max()) for g, i in zip(got, initial)) > 1e-3  # it trained
    # pieces preconditioned on their own: not the whole-matrix result
    assert max(float((g - w).abs().max()) for g, w in zip(got, want)) > 1e-6
