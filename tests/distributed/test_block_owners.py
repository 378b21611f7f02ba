"""Each block of a blocked parameter has its own owner, and data parallelism stays exact.

``block_size=8`` cuts the problem's (16, 16), (24, 24) and (61, 61) or (64, 64) parameters into
4, 9 and 64 blocks (61: the last ones padded); the large one holds over half the work, so at 2
and 3 ranks its blocks (and others') spread over several owners (each checked to happen). Why
the shapes differ by world size: ``block_owner_scenarios.SPLIT_SHAPES``. Every run
is fp64 and compared with single-process SOAP on the same full batch: only the summation order
of the gradient average differs, so 1e-10 (measured <= 1e-14) holds on any CPU while a block
stepped twice, skipped, or put back in the wrong place moves the result by > 1e-3.
"""

from __future__ import annotations

import math

import pytest
import torch

from distsoap.testing.local_ranks import run_ranks
from tests.distributed import block_owner_scenarios as bo
from tests.distributed.scenarios import UNUSED_SHAPE
from tests.problems import relative_difference

TOLERANCE = 1e-10  # fp64: summation order only (see the module docstring)


def _split(pieces: list) -> dict[int, list[int]]:
    """Parameter index -> the owners of its pieces, for parameters with several."""
    owners: dict[int, list[int]] = {}
    for param, owner, rows in pieces:
        if rows is not None:
            owners.setdefault(param, []).append(owner)
    return owners


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_split_parameters_match_single_process(strategy, world):
    results = run_ranks(bo.train_split, world, strategy=strategy, steps=12)
    pieces = results[0]["pieces"]
    split = _split(pieces)
    assert all(len(set(o)) >= 2 for o in split.values())
    assert {(64, 64), (61, 61)} <= results[0]["split_shapes"]  # the large and the padded one
    assert all(r["pieces"] == pieces for r in results)  # one placement, the same everywhere
    reference = bo.single(world, 12)["params"]
    for rank, result in enumerate(results):
        assert relative_difference(result["params"], reference) < TOLERANCE, rank
    # every block's state is held exactly once: the ranks' bytes add up to one process's
    assert sum(r["state_bytes"] for r in results) == bo.single_bytes(world, 2)


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_a_nan_in_one_piece_skips_every_piece(strategy):
    results = run_ranks(bo.nan_in_one_piece, 3, strategy=strategy)
    assert len(set(results[0]["owners"])) >= 2  # the poisoned parameter is split
    reference = bo.single(3, 8, nan=True)
    assert reference["skips"] == 1
    clean = bo.single(3, 8)
    assert relative_difference(clean["params"], reference["params"]) > 1e-3  # the skip matters
    for rank, result in enumerate(results):
        assert relative_difference(result["params"], reference["params"]) < TOLERANCE, rank
        if rank in results[0]["owners"]:
            assert result["skips"] == 1, rank  # counted by every owner of a piece


def test_a_nan_in_one_shard_skips_every_piece_under_fsdp2():
    """The direct exchange: the owner whose blocks hold the NaN tells the others."""
    results = run_ranks(bo.nan_in_one_piece_fsdp2, 3)
    assert len(set(results[0]["owners"])) >= 2 and results[0]["direct"]
    reference = bo.single(3, 8, nan=True, skips="global", shapes=bo.FSDP_SHAPES)
    assert reference["skips"] == 1
    for rank, result in enumerate(results):
        assert relative_difference(result["params"], reference["params"]) < TOLERANCE, rank
        if rank in results[0]["owners"]:
            assert result["skips"] == 1, rank  # counted by every owner of a piece


def test_split_state_resumes_in_one_process_and_back():
    world, split_at, steps = 3, 6, 12
    runs = run_ranks(bo.save_split_then_continue, world, split_at=split_at, steps=steps)
    assert runs[0]["split"]
    # the split run's consolidated state, resumed in one process, ends where the split run did
    resumed = bo.single(world, steps, saved=runs[0]["saved"], start=split_at)
    assert relative_difference(resumed["params"], runs[0]["params"]) < TOLERANCE
    # and a single process's state, resumed split over 3 ranks, ends where one process does
    saved = bo.saved_single(world, split_at)
    back = run_ranks(bo.resume_split, world, saved=saved, start=split_at, steps=steps)
    uninterrupted = bo.single(world, steps)
    for rank, result in enumerate(back):
        assert relative_difference(result["params"], uninterrupted["params"]) < TOLERANCE, rank


@pytest.mark.parametrize("at_first_call", [True, False], ids=["first_call", "refresh"])
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_a_drift_in_one_piece_moves_every_piece_to_fp32(strategy, at_first_call):
    """One process moves a whole parameter to fp32 bases when any block drifts; so must all
    the owners of a split parameter when the drift guard fires on one of them (made to fire on
    the last rank alone, for every block it refreshes then)."""
    world = 3
    results = run_ranks(bo.drift_on_one_rank, world, strategy=strategy, at_first_call=at_first_call)
    _check_every_piece_moved(results, world)


def _check_every_piece_moved(results: list[dict], world: int) -> None:
    """The drift fired on the last rank: every piece of its split parameters is fp32 now."""
    pieces = results[0]["pieces"]
    last = world - 1
    split_on_last = {
        p
        for p, owner, rows in pieces
        if rows is not None and owner == last and p in results[last]["held"]  # has bases
    }
    assert split_on_last  # the last rank holds pieces of split parameters with bases
    for param in split_on_last:
        owners = {owner for p, owner, rows in pieces if p == param}
        assert len(owners) >= 2
        for owner in owners:  # every piece, not just the last rank's, moved once
            assert results[owner]["held"][param] == (torch.float32, 1), (param, owner)
    untouched = [
        (p, owner)
        for p, owner, rows in pieces
        if owner != last and all(o != last for q, o, _ in pieces if q == p)
    ]
    assert untouched  # pieces and parameters without a piece on the last rank keep bf16
    for param, owner in untouched:
        if param in results[owner]["held"]:
            assert results[owner]["held"][param] == (torch.bfloat16, 0), (param, owner)


@pytest.mark.parametrize(
    "world,hsdp,direct", [(2, False, True), (3, False, True), (3, False, False), (4, True, True)]
)
def test_fsdp2_split_parameters_match_single_process(world, hsdp, direct):
    """Under FSDP2 (and HSDP on a (2, 2) mesh) the blocks of a split parameter go straight
    between the ranks holding its dim-0 shards and their owners (``direct``), or through an
    assembler that sends the other owners their rows and joins their update rows before
    scattering the whole update (the path of layouts with other pieces)."""
    results = run_ranks(bo.train_split_fsdp2, world, steps=12, hsdp=hsdp, direct=direct)
    split = _split(results[0]["pieces"])
    assert split and all(len(set(o)) >= 2 for o in split.values())
    assert (64, 64) in results[0]["split_shapes"]
    rows_sent = _rows_sent(results)
    if direct:  # every split parameter here is blocked in boxes of its own dims
        assert results[0]["direct"] == results[0]["split"] and rows_sent == 0
    else:
        assert results[0]["direct"] == [] and rows_sent > 0
    reference = bo.single(world, 12, skips="global", shapes=bo.FSDP_SHAPES)["params"]
    for rank, result in enumerate(results):
        assert relative_difference(result["params"], reference) < TOLERANCE, rank
    single_bytes = bo.single_bytes(world, 2, skips="global", shapes=bo.FSDP_SHAPES)
    assert sum(r["state_bytes"] for r in results) == single_bytes


def test_fsdp2_split_state_resumes_with_dcp_on_another_split(tmp_path):
    """Saved with torch.distributed.checkpoint at 3 ranks (blocks keyed one by one), resumed at
    3 and at 2 ranks, whose placements split the parameters differently, on the same data."""
    checkpoint = str(tmp_path / "step_6")
    saved = run_ranks(bo.fsdp2_save_and_continue, 3, checkpoint=checkpoint, split_at=6, steps=12)
    assert saved[0]["split"]
    uninterrupted = saved[0]["params"]
    resumed = {}
    for world in (3, 2):
        resumed[world] = run_ranks(
            bo.fsdp2_resume, world, checkpoint=checkpoint, data_world=3, start=6, steps=12
        )
        for rank, result in enumerate(resumed[world]):
            assert relative_difference(result["params"], uninterrupted) < TOLERANCE, (world, rank)
    assert resumed[3][0]["pieces"] != resumed[2][0]["pieces"]  # another placement of the rows


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp2"])
def test_adaptive_refresh_skips_a_split_parameter_only_when_every_piece_may(strategy):
    """One process skips a due refresh only if all of a parameter's blocks are still diagonal.

    The masses are made to read 0 (every block diagonal) on the last rank only: the pieces
    there may not skip, since the other pieces of their parameters are not diagonal, while the
    parameters held whole there do skip. With 0 on every rank, every piece skips, as in one
    process with the same masses.
    """
    world, last = 3, 2
    results = run_ranks(bo.adaptive_split, world, strategy=strategy, zero_on="last_rank")
    pieces = results[0]["pieces"]
    split_on_last = {p for p, owner, rows in pieces if rows is not None and owner == last}
    whole_on_last = {p for p, owner, rows in pieces if rows is None and owner == last}
    assert {p for p in split_on_last if p in results[last]["skipped"]}  # with bases
    assert any(results[last]["skipped"].get(p, 0) > 0 for p in whole_on_last)  # the zero worked
    for param in split_on_last:
        for owner in {o for p, o, _ in pieces if p == param}:
            assert results[owner]["skipped"].get(param, 0) == 0, (param, owner)
    everywhere = run_ranks(bo.adaptive_split, world, strategy=strategy, zero_on="every_rank")
    fsdp2 = strategy == "fsdp2"
    reference = bo.single_adaptive(world, 12, zero_masses=True, fsdp2=fsdp2)
    assert reference["skipped"] > 0
    plain = bo.single_adaptive(world, 12, zero_masses=False, fsdp2=fsdp2)
    assert plain["skipped"] == 0
    assert relative_difference(plain["params"], reference["params"]) > 1e-3  # skips matter
    for rank, result in enumerate(everywhere):
        assert relative_difference(result["params"], reference["params"]) < TOLERANCE, rank
        # every due refresh of the 12 steps was skipped (at most 2 in a row; at most 2 were
        # due): each cost GG Q once per block held, the pieces of split parameters too (the
        # measuring before the owners agree computes the products the refresh then reuses)
        assert result["product_flops"] > 0, rank
        assert result["refresh_flops"] == result["product_flops"], rank


def _rows_sent(results: list[dict]) -> int:
    """Bytes of the assembler's round trips, all ranks together."""
    return sum(r["sent"].get("grad_rows", 0) + r["sent"].get("update_rows", 0) for r in results)


def test_fsdp1_split_parameters_match_single_process():
    """FSDP1's pieces are ranges of the flattened parameter, cut inside rows: the parts of a
    block in one are a few boxes, sent straight to its owner (the assembler's round trip, the
    other path, is held against one process under FSDP2 above)."""
    results = run_ranks(bo.train_split_fsdp1, 3, steps=12)
    split = _split(results[0]["pieces"])
    assert split and all(len(set(o)) >= 2 for o in split.values())
    first = results[0]
    assert first["cut_inside_rows"]
    assert first["direct"] == first["split"] and _rows_sent(results) == 0
    reference = bo.single(3, 12, skips="none", shapes=bo.FSDP_SHAPES)["params"]
    for rank, result in enumerate(results):
        assert relative_difference(result["params"], reference) < TOLERANCE, rank


DEEPSPEED_FP32 = 1e-4  # fp32 on both sides: same math, sums in another order (test_deepspeed.py)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_split_parameters_match_single_process(stage):
    """ZeRO 2 and 3 take the assembler round trip too, on DeepSpeed's flat fp32 partitions (stage
    1 finds its pieces through the same ``_hp_mapping`` as 2); at stage 2 DeepSpeed steps each of
    the problem's three param groups in its own call."""
    pytest.importorskip("deepspeed")
    world = 3
    results = run_ranks(bo.train_split_deepspeed, world, stage=stage, steps=12, timeout=600)
    assert results[0]["strategy"] == f"deepspeed_zero{stage}"
    pieces = results[0]["pieces"]
    split = _split(pieces)
    assert split and all(len(set(o)) >= 2 for o in split.values())
    assert (64, 64) in results[0]["split_shapes"]
    assert all(r["pieces"] == pieces for r in results)
    assert results[0]["direct"] == results[0]["split"] and _rows_sent(results) == 0
    shapes, skips = bo.FSDP_SHAPES, "none"
    reference = bo.single(world, 12, skips=skips, shapes=shapes, dtype=torch.float32)["params"]
    for rank, result in enumerate(results):
        assert relative_difference(result["params"], reference) < DEEPSPEED_FP32, rank
    single_bytes = bo.single_bytes(world, 2, skips=skips, shapes=shapes, dtype=torch.float32)
    # DeepSpeed gives the unused (8, 8) parameter a zero gradient, so it has state there: two
    # moments, two factors and two bases of 8 x 8 fp32 (one process never allocates it)
    unused = 6 * math.prod(UNUSED_SHAPE) * 4
    assert sum(r["state_bytes"] for r in results) == single_bytes + unused


def test_deepspeed_drift_in_one_piece_moves_every_piece_to_fp32():
    """As under ddp, with DeepSpeed stepping one param group per call (ZeRO-2): a piece's
    verdict at a refresh waits for its own group's call (the (24, 24) parameter, split, is in
    the second). The first call's verdicts are deferred and settled the same way (ddp, zero2
    above)."""
    pytest.importorskip("deepspeed")
    world = 3
    results = run_ranks(
        bo.train_split_deepspeed,
        world,
        stage=2,
        steps=12,
        drift_at_first_call=False,
        timeout=600,
    )
    assert (24, 24) in results[0]["split_shapes"]
    _check_every_piece_moved(results, world)


@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_split_checkpoint_continues_bit_identically(stage, tmp_path):
    """DeepSpeed's own save_checkpoint / load_checkpoint with split parameters: at stage 0
    rank 0 writes every owner's rows (gathered) and each rank loads its own; from stage 1 on
    each rank writes and loads its own pieces. Same process layout, same data, same ops: the
    resumed run repeats the first one bit for bit."""
    pytest.importorskip("deepspeed")
    results = run_ranks(
        bo.deepspeed_save_and_resume, 3, stage=stage, path=str(tmp_path), timeout=600
    )
    assert results[0]["split"]
    for rank, result in enumerate(results):
        for a, b in zip(result["straight"], result["resumed"], strict=True):
            assert torch.equal(a, b), rank


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_split_merged_dims_take_the_round_trip_and_match_single_process(strategy):
    """A conv weight under ``merge_dims`` is blocked in its merged dims, so its blocks are not
    boxes of its own dims: split over owners, it goes through its assembler (no switch set),
    from FSDP2's dim-0 shards or FSDP1's flat pieces, and training still equals one process."""
    train = bo.train_split_fsdp2 if strategy == "fsdp2" else bo.train_split_fsdp1
    results = run_ranks(train, 3, steps=12, shapes=bo.MERGED_SHAPES, merge_dims=True)
    conv = (64, 8, 3, 3)
    assert len(results[0]["owners_by_shape"][conv]) >= 2  # split over several owners
    assert conv not in results[0]["direct_shapes"]  # the round trip, chosen by the layout
    assert (64, 64) in results[0]["direct_shapes"]  # the others still go direct
    assert _rows_sent(results) > 0
    skips = "global" if strategy == "fsdp2" else "none"  # as train_split_fsdp1 says
    reference = bo.single(3, 12, skips=skips, shapes=bo.MERGED_SHAPES, merge_dims=True)
    for rank, result in enumerate(results):
        assert relative_difference(result["params"], reference["params"]) < TOLERANCE, rank
