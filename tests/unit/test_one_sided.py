"""``one_sided``: only the smallest factored dim of each block is rotated."""

from __future__ import annotations

import pytest
import torch

from distsoap import SOAP
from distsoap.engine.blocks import make_block_spec
from distsoap.math.reference import ReferenceSOAP


def _spec(shape, **options):
    base = dict(
        max_precond_dim=100, merge_dims=False, precondition_1d=True, data_format="channels_first"
    )
    return make_block_spec(shape, **{**base, **options})


@pytest.mark.parametrize(
    ("shape", "options", "factored"),
    [
        ((4, 8), {}, (True, False)),
        ((8, 4), {}, (False, True)),
        ((5, 5), {}, (True, False)),  # equal dims: the first
        ((6, 3, 4), {}, (False, True, False)),
        ((200, 8, 300), {}, (False, True, False)),  # 200, 300 above max_precond_dim anyway
        ((7,), {}, (True,)),  # one factored dim: unchanged
        ((4, 2, 9), {"merge_dims": True, "max_precond_dim": 10}, (True, False)),  # (8, 9)
        ((3, 4, 6), {"stack_dims": 1}, (True, False)),  # per matrix of the stack
    ],
)
def test_only_the_smallest_factored_dim_is_kept(shape, options, factored):
    assert _spec(shape, one_sided=True, **options).factored == factored


def _train(optimizer, shapes, steps, **options):
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes
    ]
    opt = optimizer(params, precondition_frequency=2, **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    return params, opt


def test_one_sided_equals_the_reference_with_the_larger_dims_unrotated():
    """(4, 8) and (3, 5, 7): with max_precond_dim=4 (and 3) the reference rotates the same dims."""
    for shapes, limit in (([(4, 8), (8, 4)], 4), ([(3, 5, 7)], 3)):
        got, opt = _train(SOAP, shapes, 7, one_sided=True)
        want, _ = _train(ReferenceSOAP, shapes, 7, max_precond_dim=limit)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)  # fp64, summation order only
        assert sum(k.startswith("factor_") for k in opt.state[got[0]]) == 1


def test_one_sided_is_a_layout_setting_checkpoints_must_agree_on():
    params, opt = _train(SOAP, [(4, 8)], 3, one_sided=True)
    other = SOAP([torch.nn.Parameter(params[0].detach().clone())])
    with pytest.raises(ValueError, match="one_sided"):
        other.load_state_dict(opt.state_dict())


def test_one_sided_must_be_a_bool():
    with pytest.raises(ValueError, match="one_sided must be True or False"):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2))], one_sided=1)
