"""copy.deepcopy and pickle give a complete optimizer that steps exactly like the original."""

import copy
import pickle

import pytest
import torch
from distsoap.kernels import compiled_rotated_adam_direction

from distsoap import SOAP
from tests.problems import RegressionProblem

SHAPES = [(16, 16), (16, 16), (12, 40), (32,)]
KWARGS = dict(lr=1e-2, precondition_frequency=3, max_precond_dim=32)
# rebuilt on first use; torch's own flag, which torch's pickling drops for every optimizer
NOT_COPIED = {"_names", "_warned_capturable_if_run_uncaptured"}


def _pickle_copy(obj):
    return pickle.loads(pickle.dumps(obj))


COPIERS = {"deepcopy": copy.deepcopy, "pickle": _pickle_copy}


def _run(problem, opt, params, start, stop):
    for step in range(start, stop):
        opt.zero_grad(set_to_none=True)
        problem.loss(params, step).backward()
        opt.step()


@pytest.mark.parametrize("copier", list(COPIERS))
def test_copy_keeps_every_attribute_and_steps_like_the_original(copier):
    problem = RegressionProblem(SHAPES)
    params = problem.make_params()
    opt = SOAP(params, **KWARGS, bucket_cap_mb=3.0, refresh_schedule="staggered")
    _run(problem, opt, params, 0, 4)
    copy_params, copied = COPIERS[copier]((params, opt))

    assert set(vars(opt)) - NOT_COPIED <= set(vars(copied))
    assert copied.strategy_options == opt.strategy_options
    assert copied.refresh_schedule == "staggered"
    group = copied.param_groups[0]
    assert [id(p) for p in copied.built_params[id(group)]] == [id(p) for p in copy_params]

    # both go on from the same state, through refreshes (every 3 updates): bit for bit equal
    _run(problem, opt, params, 4, 12)
    _run(problem, copied, copy_params, 4, 12)
    for mine, theirs in zip(params, copy_params):
        assert torch.equal(mine.detach(), theirs.detach())

    extra = torch.nn.Parameter(torch.randn(6, 6))
    copied.add_param_group({"params": [extra], "lr": 0.5})
    assert copied.built_params[id(copied.param_groups[1])] == [extra]


@pytest.mark.parametrize("copier", list(COPIERS))
def test_copy_of_a_fresh_optimizer_completes_its_state_dict(copier):
    """The state-dict hook that writes every block's keys is re-registered on the copy."""
    param = torch.nn.Parameter(torch.randn(8, 8))
    copied = COPIERS[copier](SOAP([param]))
    assert "basis_0" in copied.state_dict()["state"][0]


def test_copy_keeps_the_compiled_elementwise_update():
    copied = copy.deepcopy(SOAP([torch.nn.Parameter(torch.randn(4, 4))], elementwise="compile"))
    assert copied.engine.elementwise is compiled_rotated_adam_direction
