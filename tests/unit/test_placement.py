import pytest
import torch

from distsoap import SOAP
from distsoap.comm import build_buckets
from distsoap.engine.blocks import make_block_spec
from distsoap.placement import (
    BlockCost,
    Piece,
    assign_owners,
    block_cost,
    choose_assemblers,
    load_balance,
    place_blocks,
)


def _gpt_costs(d=256, layers=4, vocab=4096, max_dim=2048):
    shapes = [(vocab, d)] + [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)] * layers
    specs = [
        make_block_spec(
            s,
            max_precond_dim=max_dim,
            merge_dims=False,
            precondition_1d=False,
            data_format="channels_first",
        )
        for s in shapes
    ]
    return [block_cost(s, 10) for s in specs]


def test_cost_model_terms():
    spec = make_block_spec(
        (30, 20),
        max_precond_dim=25,
        merge_dims=False,
        precondition_1d=False,
        data_format="channels_first",
    )
    cost = block_cost(spec, 10)
    # only the 20-dim is factored: 3 * 600 * 20 rotation/product flops + 2 * 20^3 / 10 refresh
    assert cost.flops == 600 * 4 + 3 * 600 * 20 + 2 * 20**3 / 10
    assert cost.state_bytes == 2 * 600 * 4 + 2 * 20 * 20 * 4


@pytest.mark.parametrize(
    "dtype, storage, expected_bytes",
    [
        (torch.float32, {}, (4, 4, 4)),
        (torch.float32, {"moment_dtype": torch.bfloat16}, (2, 4, 4)),
        (torch.bfloat16, {"moment_dtype": torch.bfloat16}, (2, 4, 4)),
        (torch.float32, {"factor_dtype": "bf16", "basis_dtype": "fp16"}, (4, 2, 2)),
        (torch.float32, {"basis_dtype": "bf16", "basis_orthogonality_tol": 1.0}, (4, 4, 2)),
        (torch.float64, {"moment_dtype": torch.bfloat16, "factor_dtype": "bf16"}, (8, 8, 8)),
    ],
)
def test_placement_counts_the_state_dtypes(dtype, storage, expected_bytes):
    """The cost model sees the dtypes SOAP really allocates (fp64 parameters: fp64 state)."""
    p = torch.nn.Parameter(torch.zeros(30, 20, dtype=dtype))
    opt = SOAP([p], **storage)
    assert opt.state_element_bytes(p) == expected_bytes
    p.grad = torch.ones_like(p)
    p.grad[0, 0] = 2.0
    opt.step()  # the first call allocates the state: the model's bytes are the real ones
    spec = opt.block_spec(p, opt.param_groups[0])
    cost = block_cost(spec, 10, *opt.state_element_bytes(p))
    assert cost.state_bytes == opt.state_bytes()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gpt_shaped_model_is_balanced(world):
    costs = _gpt_costs()
    owners = assign_owners(costs, world)
    balance = load_balance(costs, owners, world)
    assert balance["flops"] <= 1.1 and balance["state_bytes"] <= 1.1


def test_deterministic_and_complete():
    costs = _gpt_costs()
    assert assign_owners(costs, 4) == assign_owners(list(costs), 4)
    assert set(assign_owners(costs, 4)) == {0, 1, 2, 3}


def test_more_ranks_than_blocks():
    owners = assign_owners([BlockCost(5.0, 10), BlockCost(3.0, 6)], 4)
    assert len(set(owners)) == 2


def test_equal_blocks_spread_evenly():
    owners = assign_owners([BlockCost(1.0, 1)] * 8, 4)
    assert sorted(owners.count(r) for r in range(4)) == [2, 2, 2, 2]


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        assign_owners([BlockCost(1.0, 1)], 0)


def test_buckets_cover_every_parameter_once_and_respect_dtype():
    import torch

    numels = [100, 50, 300, 20, 20, 400]
    dtypes = [torch.float32] * 3 + [torch.bfloat16] * 3
    owners = [0, 1, 0, 1, 0, 1]
    buckets = build_buckets(numels, dtypes, owners, 2, cap_elements=350)
    seen = [i for b in buckets for i in b.params]
    assert sorted(seen) == list(range(6))
    for b in buckets:
        assert len({dtypes[i] for i in b.params}) == 1
        assert b.total == sum(numels[i] + 1 for i in b.params)  # one flag per parameter
        for rank, part in enumerate(b.owned):
            assert all(owners[i] == rank for i in part)


def _rows_by_param(pieces, rows):
    held = {}
    for piece in pieces:
        held.setdefault(piece.param, []).extend(
            range(rows[piece.param]) if piece.rows is None else piece.rows
        )
    return {i: sorted(r) for i, r in held.items()}


def test_place_blocks_keeps_parameters_whole_when_that_is_balanced():
    costs = [BlockCost(1.0, 10)] * 8
    pieces = place_blocks(costs, [4] * 8, [True] * 8, 4)
    assert all(p.rows is None for p in pieces)
    assert [p.param for p in pieces] == list(range(8))


def test_place_blocks_splits_a_dominant_parameter_and_balances():
    # one parameter of 64 blocks holds 64 of 76 units of work: whole, its owner would hold 84%
    costs = [BlockCost(64.0, 640)] + [BlockCost(1.0, 10)] * 12
    rows = [64] + [1] * 12
    pieces = place_blocks(costs, rows, [True] * 13, 4)
    owners_of_big = {p.owner for p in pieces if p.param == 0}
    assert owners_of_big == {0, 1, 2, 3}
    assert _rows_by_param(pieces, rows) == {i: list(range(n)) for i, n in enumerate(rows)}
    load = [0.0] * 4
    for p in pieces:
        share = 1 if p.rows is None else len(p.rows) / rows[p.param]
        load[p.owner] += costs[p.param].flops * share
    assert max(load) / (sum(load) / 4) < 1.05  # whole: 64 / 19 = 3.4x the mean


def test_place_blocks_never_splits_what_may_not_be_split():
    costs = [BlockCost(64.0, 640)] + [BlockCost(1.0, 10)] * 12
    pieces = place_blocks(costs, [64] + [1] * 12, [False] + [True] * 12, 4)
    assert [p.rows for p in pieces if p.param == 0] == [None]


def _round_trip_traffic(pieces, row_numel, assemblers, world):
    """Elements each rank sends and receives in the round trips: the definition, per piece."""
    traffic = [0] * world
    for p in pieces:
        if p.rows is not None and p.owner != assemblers[p.param]:
            moved = 2 * len(p.rows) * row_numel[p.param]  # rows out, update rows back
            traffic[p.owner] += moved
            traffic[assemblers[p.param]] += moved
    return traffic


def test_assemblers_spread_the_round_trips():
    # eight parameters split the same way over ranks 0-3: taking the lowest owner (or the one
    # with the most rows) as every assembler would put all eight round trips on one rank
    pieces = [
        Piece(i, owner, tuple(range(4 * owner, 4 * owner + 4)))
        for i in range(8)
        for owner in range(4)
    ]
    assemblers = choose_assemblers(pieces, [100] * 8, 4)
    assert sorted(assemblers) == list(range(8))
    assert sorted(assemblers.values()) == [0, 0, 1, 1, 2, 2, 3, 3]
    traffic = _round_trip_traffic(pieces, [100] * 8, assemblers, 4)
    lowest = _round_trip_traffic(pieces, [100] * 8, dict.fromkeys(range(8), 0), 4)
    assert max(traffic) == 2 * 2 * 12 * 100 + 6 * 2 * 4 * 100  # 2 assembled, 6 as an owner
    assert max(lowest) == 8 * 2 * 12 * 100


def test_an_assembler_is_an_owner_and_prefers_the_most_rows():
    # alone, a parameter goes to the owner of most of its rows: the fewest rows travel
    pieces = [Piece(0, 0, (0,)), Piece(0, 2, (1, 2, 3)), Piece(0, 3, (4,)), Piece(1, 1, None)]
    assert choose_assemblers(pieces, [7, 7], 4) == {0: 2}
    # an equal split: the lowest rank
    assert choose_assemblers([Piece(0, 1, (0,)), Piece(0, 3, (1,))], [5], 4) == {0: 1}
