import pytest
import torch

from distsoap import SOAP
from distsoap.comm import build_buckets
from distsoap.engine.blocks import make_block_spec
from distsoap.placement import BlockCost, assign_owners, block_cost, load_balance


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
