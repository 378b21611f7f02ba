"""Staggered refreshes: balanced phases, and SOAP equal to the reference on the same schedule."""

import pytest
import torch

from distsoap import SOAP, ReferenceSOAP
from distsoap.engine.schedule import refresh_offsets
from tests.problems import RegressionProblem, relative_difference, train


def test_offsets_balance_cost_over_the_cycle():
    offsets = refresh_offsets([1.0] * 20, 10)
    assert sorted(offsets.count(p) for p in range(10)) == [2] * 10
    costs = [64.0**3] * 4 + [16.0**3] * 30
    offsets = refresh_offsets(costs, 4)
    loads = [sum(c for c, o in zip(costs, offsets) if o == p) for p in range(4)]
    assert max(loads) <= 1.05 * sum(costs) / 4
    with pytest.raises(ValueError, match="frequency must be >= 1"):
        refresh_offsets([1.0], 0)


def test_staggered_soap_matches_reference_on_the_same_schedule():
    shapes = [(16, 16), (16, 16), (24, 24), (8, 6, 3, 3), (12, 12), (32,)]
    problem = RegressionProblem(shapes, dtype=torch.float64)
    holder = {}

    def soap(ps):
        holder["opt"] = SOAP(ps, lr=1e-2, precondition_frequency=5, refresh_schedule="staggered")
        return holder["opt"]

    fast = train(problem, soap, 30)
    opt = holder["opt"]
    phases = [opt.state[p].get("refresh_offset") for p in opt.param_groups[0]["params"]]
    assert len({p for p in phases[:5]}) > 1  # the matrices really refresh on different steps
    by_position = dict(enumerate(phases))

    def reference(ps):
        index = {id(p): i for i, p in enumerate(ps)}
        return ReferenceSOAP(
            ps,
            lr=1e-2,
            precondition_frequency=5,
            refresh_offset=lambda p: by_position[index[id(p)]],
        )

    slow = train(problem, reference, 30)
    assert relative_difference(fast, slow) < 1e-10  # fp64


def test_each_block_refreshes_every_frequency_updates():
    p = torch.nn.Parameter(torch.randn(8, 8))
    q = torch.nn.Parameter(torch.randn(8, 8))
    opt = SOAP([p, q], precondition_frequency=4, refresh_schedule="staggered")
    changes = {0: [], 1: []}
    previous = None
    for _ in range(14):
        p.grad, q.grad = torch.randn(8, 8), torch.randn(8, 8)
        opt.step()
        bases = [opt.state[x]["basis_0"].clone() for x in (p, q)]
        if previous is not None:
            for i in (0, 1):
                if not torch.equal(bases[i], previous[i]):
                    changes[i].append(opt.state[(p, q)[i]]["step"])
        previous = bases
    offsets = [opt.state[x]["refresh_offset"] for x in (p, q)]
    assert offsets[0] != offsets[1]
    for i in (0, 1):
        assert changes[i] == [t for t in range(1, 14) if (t + offsets[i]) % 4 == 0]


def test_unknown_schedule():
    with pytest.raises(ValueError, match="refresh_schedule must be one of"):
        SOAP([torch.nn.Parameter(torch.randn(2))], refresh_schedule="random")
