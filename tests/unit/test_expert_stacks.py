"""``stack_dims``: a stack of matrices (MoE experts) is SOAP on each matrix as its own parameter."""

from __future__ import annotations

import pytest
import torch

from distsoap import SOAP
from distsoap.checkpointing.stack_rows import join_rows, split_rows
from distsoap.engine.blocks import make_block_spec
from distsoap.math.reference import ReferenceSOAP
from distsoap.placement import block_cost
from tests.expert_model import OPTIONS, batch, initial_weights, loss_of

EXPERTS = 3


def _train(stacked: bool, steps: int, dtype=torch.float64, optimizer=SOAP, **options):
    """Train the MoE layer; experts as one stack (stack_dims=1) or as separate parameters."""
    weights = initial_weights(EXPERTS, dtype)
    dense = [torch.nn.Parameter(weights["dense_weight"]), torch.nn.Parameter(weights["dense_bias"])]
    if stacked:
        experts = torch.nn.Parameter(weights["experts"].clone())
        groups = [{"params": dense}, {"params": [experts], "stack_dims": 1}]
    else:
        experts = [torch.nn.Parameter(w.clone()) for w in weights["experts"]]
        groups = [{"params": dense}, {"params": experts}]
    opt = optimizer(groups, **{**OPTIONS, **options})
    for step in range(steps):
        opt.zero_grad()
        loss_of(*dense, experts, *batch(step, EXPERTS, dtype)).backward()
        opt.step()
    final = [p.detach().clone() for p in dense]
    final.append(
        experts.detach().clone() if stacked else torch.stack([e.detach() for e in experts])
    )
    return final, opt


@pytest.mark.parametrize(
    "options",
    [{}, {"normalize_grads": True}, {"precondition_frequency": 3, "correct_bias": False}],
    ids=["default", "normalize_grads", "frequency_3_no_bias_correction"],
)
def test_stack_equals_readable_reference_on_separate_experts(options):
    got, _ = _train(True, 8, **options)
    want, _ = _train(False, 8, optimizer=ReferenceSOAP, **options)
    for g, w in zip(got, want, strict=True):
        # fp64: batched vs per-matrix summation order only (measured ~1e-16)
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_stack_equals_plain_soap_on_separate_experts_in_fp32():
    got, _ = _train(True, 8, dtype=torch.float32)
    want, _ = _train(False, 8, dtype=torch.float32)
    for g, w in zip(got, want, strict=True):
        # fp32: eigh/QR on a stack of 3 vs a bucket of 3 rows; rounding only (measured ~1e-7)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_stack_state_has_one_factor_and_basis_per_expert():
    _, opt = _train(True, 3)
    experts = opt.param_groups[1]["params"][0]
    state = opt.state[experts]
    assert state["exp_avg"].shape == (EXPERTS, 6, 6)
    assert state["factor_0"].shape == state["basis_0"].shape == (EXPERTS, 6, 6)
    for basis in state["basis_0"]:  # each expert's own orthonormal basis
        torch.testing.assert_close(basis.T @ basis, torch.eye(6, dtype=basis.dtype))
    assert not torch.allclose(state["basis_0"][0], state["basis_0"][1])


def test_two_stack_dims_and_a_stack_of_merged_dims():
    """(2, 3, 5, 5) with stack_dims=2 is 6 matrices; (3, 2, 2, 5) with merge_dims is 3 (4, 5).

    Square-ish full-rank gradients (10 random rows per factor update over the steps) keep the
    comparison well conditioned.
    """
    torch.manual_seed(0)
    grid = torch.nn.Parameter(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    merged = torch.nn.Parameter(torch.randn(3, 2, 2, 5, dtype=torch.float64))
    flat = [torch.nn.Parameter(m.clone()) for m in grid.detach().reshape(6, 5, 5)]
    pieces = [torch.nn.Parameter(m.clone()) for m in merged.detach()]
    opt = SOAP(
        [{"params": [grid], "stack_dims": 2}, {"params": [merged], "stack_dims": 1}],
        merge_dims=True,
        max_precond_dim=5,
        precondition_frequency=2,
    )
    ref = ReferenceSOAP(flat + pieces, merge_dims=True, max_precond_dim=5, precondition_frequency=2)
    saved = join_rows(opt.state_dict()["state"][1])  # saved one key per matrix
    assert saved["exp_avg"].shape == (3, 4, 5)  # (2, 2) merged to 4
    for step in range(6):
        gen = torch.Generator().manual_seed(step)
        g_grid = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
        g_merged = torch.randn(3, 2, 2, 5, generator=gen, dtype=torch.float64)
        grid.grad, merged.grad = g_grid, g_merged
        for p, g in zip(flat, g_grid.reshape(6, 5, 5)):
            p.grad = g.clone()
        for p, g in zip(pieces, g_merged):
            p.grad = g.clone()
        opt.step()
        ref.step()
    # fp64, summation order only
    torch.testing.assert_close(
        grid.detach().reshape(6, 5, 5), torch.stack(flat), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(merged.detach(), torch.stack(pieces), rtol=0, atol=1e-12)


def test_a_stack_starts_once_every_expert_has_a_gradient():
    experts = torch.nn.Parameter(torch.randn(EXPERTS, 4, 4, dtype=torch.float64))
    opt = SOAP([experts], stack_dims=1)
    grad = torch.randn(EXPERTS, 4, 4, dtype=torch.float64)
    grad[1] = 0  # expert 1 got no tokens
    experts.grad = grad
    opt.step()
    assert not opt.state[experts]["bases_ready"]
    assert torch.count_nonzero(opt.state[experts]["factor_0"]) == 0  # the call was discarded
    experts.grad = torch.randn(EXPERTS, 4, 4, dtype=torch.float64)
    opt.step()
    assert opt.state[experts]["bases_ready"]


def test_stack_checkpoint_round_trip_continues_bit_for_bit():
    _, opt = _train(True, 3)
    saved = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = SOAP([{"params": copies[:2]}, {"params": copies[2:], "stack_dims": 1}], **OPTIONS)
    resumed.load_state_dict(saved)
    opt.zero_grad()
    for step in range(3, 6):
        for group_params in (params, copies):
            loss_of(*group_params, *batch(step, EXPERTS, torch.float64)).backward()
        opt.step()
        resumed.step()
        opt.zero_grad()
        resumed.zero_grad()
    for a, b in zip(params, copies):
        assert torch.equal(a, b)  # same operations on the same state


def test_checkpoint_of_a_stack_is_refused_without_stack_dims():
    _, opt = _train(True, 3)
    experts = torch.nn.Parameter(opt.param_groups[1]["params"][0].detach().clone())
    dense = [torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    other = SOAP([{"params": dense}, {"params": [experts]}], **OPTIONS)
    with pytest.raises(ValueError, match="stack_dims"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_invalid_stack_dims_name_the_valid_range(bad):
    with pytest.raises(ValueError, match="stack_dims must be an integer >= 0"):
        SOAP([torch.nn.Parameter(torch.zeros(2, 3, 3))], stack_dims=bad)


def test_a_parameter_with_too_few_dims_for_its_stack_is_refused():
    with pytest.raises(ValueError, match=r"has 2 dims, but its group has stack_dims=2"):
        SOAP([{"params": [torch.nn.Parameter(torch.zeros(3, 3))], "stack_dims": 2}])


def test_placement_cost_of_a_stack_is_that_of_its_matrices():
    stack = make_block_spec(
        (4, 8, 6),
        max_precond_dim=100,
        merge_dims=False,
        precondition_1d=False,
        data_format="channels_first",
        stack_dims=1,
    )
    one = make_block_spec(
        (8, 6),
        max_precond_dim=100,
        merge_dims=False,
        precondition_1d=False,
        data_format="channels_first",
    )
    stacked, single = block_cost(stack, 10), block_cost(one, 10)
    assert stacked.state_bytes == 4 * single.state_bytes
    assert stacked.flops == pytest.approx(4 * single.flops)


def test_state_rows_split_and_join_by_global_expert_index():
    entry = {
        "step": 4,
        "block_layout": "local",
        "exp_avg": torch.arange(2 * 3.0).view(2, 3),
        "factor_0": torch.arange(2 * 9.0).view(2, 3, 3),
    }
    split = split_rows(entry, (5, 2), "whole")
    assert split["block_layout"] == "whole" and split["step"] == 4
    assert torch.equal(split["exp_avg@stack5"], entry["exp_avg"][0])
    assert torch.equal(split["factor_0@stack2"], entry["factor_0"][1])
    joined = join_rows(split, (2, 5), ("whole", "local"))  # another order: another rank's split
    assert torch.equal(joined["exp_avg"], entry["exp_avg"].flip(0))
    assert joined["block_layout"] == "local"
    assert "exp_avg" not in join_rows(split, (2, 7), ("whole", "local"))  # expert 7 absent
    whole = {"block_layout": "whole", "exp_avg": torch.arange(6.0).view(6, 1)}
    assert join_rows(whole, (4, 1), ("whole", "local"))["exp_avg"].flatten().tolist() == [4, 1]
    other = {"block_layout": "another", "exp_avg": torch.arange(6.0).view(6, 1)}
    assert join_rows(other, (4, 1), ("whole", "local")) == other  # left for the layout check


def test_torchtitan_config_gives_its_grouped_experts_a_stack_group():
    """torchtitan's own GroupedExperts weights, selected by pattern into a stack_dims=1 group."""
    pytest.importorskip("torchtitan")
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
    from torchtitan.models.common.moe import GroupedExperts

    import distsoap.integrations.torchtitan  # noqa: F401  (registers "SOAP")

    model = torch.nn.Module()
    model.experts = GroupedExperts(GroupedExperts.Config(dim=4, hidden_dim=6, num_experts=3))
    model.router = torch.nn.Linear(4, 3, bias=False)
    for p in model.experts.parameters():
        torch.nn.init.normal_(p)
    config = OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r".*experts\..*",
                optimizer_name="SOAP",
                optimizer_kwargs={"lr": 1e-3, "stack_dims": 1},
            ),
            ParamGroupConfig(pattern=r".*", optimizer_name="SOAP", optimizer_kwargs={"lr": 1e-3}),
        ]
    )
    container = config.build(model_parts=[model])
    soap = container.optimizers[0]
    stacks = [g for g in soap.param_groups if g["stack_dims"] == 1]
    assert [len(g["params"]) for g in stacks] == [3]  # w1, w2, w3
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    container.step()
    state = soap.state[model.experts.w1_EFD]
    assert state["factor_0"].shape == (3, 6, 6) and state["factor_1"].shape == (3, 4, 4)
    assert soap.state[model.router.weight]["factor_0"].shape == (3, 3)


def test_a_state_saved_one_key_per_expert_loads_into_a_whole_stack():
    """A stack is saved one key per expert, in one process as by ranks that each hold some
    experts (expert parallelism), and loads back into a whole stack."""
    _, opt = _train(True, 3)
    saved = opt.state_dict()  # the experts: dense weight, dense bias, then the stack
    assert "exp_avg@stack2" in saved["state"][2] and "exp_avg" not in saved["state"][2]
    params = [p for g in opt.param_groups for p in g["params"]]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = SOAP([{"params": copies[:2]}, {"params": copies[2:], "stack_dims": 1}], **OPTIONS)
    resumed.load_state_dict(saved)
    for key, value in opt.state[params[2]].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed.state[copies[2]][key], value), key
    saved["state"][2].pop("factor_0@stack1")  # one expert's factor missing: refused, named
    with pytest.raises(ValueError, match="factor_0"):
        SOAP(
            [{"params": copies[:2]}, {"params": copies[2:], "stack_dims": 1}], **OPTIONS
        ).load_state_dict(saved)
