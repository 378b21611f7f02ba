"""Parameters with zero elements are no-ops: no state, no update, no error (as torch's AdamW)."""

import pytest
import torch

from distsoap import SOAP
from tests.problems import RegressionProblem

SHAPES = [(16, 16), (12, 40), (32,)]
EMPTY_SHAPES = [(0, 3), (0,), (3, 0), (2, 0, 4), (0, 3, 3, 3)]
OPTIONS = {
    "default": {},
    "merge_dims": dict(merge_dims=True, data_format="channels_last"),
    "precondition_1d": dict(precondition_1d=True),
    "staggered": dict(refresh_schedule="staggered"),
}


def _run(options: dict, with_empty: bool) -> tuple[list[torch.Tensor], SOAP, list]:
    problem = RegressionProblem(SHAPES)
    params = problem.make_params()
    empty = [torch.nn.Parameter(torch.zeros(s)) for s in EMPTY_SHAPES] if with_empty else []
    opt = SOAP(params + empty, lr=1e-2, precondition_frequency=3, weight_decay=0.1, **options)
    for step in range(8):  # through two refreshes
        opt.zero_grad(set_to_none=True)
        loss = problem.loss(params, step) + sum(e.sum() for e in empty)
        loss.backward()
        opt.step()
    return params, opt, empty


@pytest.mark.parametrize("options", list(OPTIONS))
def test_zero_size_parameters_change_nothing(options):
    params, opt, empty = _run(OPTIONS[options], with_empty=True)
    reference, _, _ = _run(OPTIONS[options], with_empty=False)
    for e, shape in zip(empty, EMPTY_SHAPES):
        assert e.grad is not None and e.grad.shape == shape  # they did get (empty) gradients
        assert len(opt.state[e]) == 0
    for mine, want in zip(params, reference):
        assert torch.equal(mine.detach(), want.detach())  # the other blocks as without them


def test_state_dict_with_zero_size_parameters_round_trips():
    params, opt, empty = _run({}, with_empty=True)
    fresh = SOAP(params + empty, lr=1e-2, precondition_frequency=3, weight_decay=0.1)
    fresh.load_state_dict(opt.state_dict())
    for e in empty:
        e.grad = torch.zeros_like(e)
    fresh.step()
    assert all(e.numel() == 0 for e in empty)
