"""load_state_dict: validated before anything changes, hooks as torch runs them, dtypes converted.

Each refused state dict must leave the optimizer exactly as it was and able to step; an
accepted one must continue exactly like the optimizer that saved it.
"""

import copy
import re

import pytest
import torch

from distsoap import SOAP, ReferenceSOAP
from tests.problems import RegressionProblem

SHAPES = [(6, 6), (5,)]


def _train(opt: SOAP, params, problem, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        problem.loss(params, step).backward()
        opt.step()


def _trained(steps=3, **kwargs):
    problem = RegressionProblem(SHAPES)
    params = problem.make_params()
    opt = SOAP(params, lr=1e-2, precondition_frequency=2, **kwargs)
    _train(opt, params, problem, steps)
    return problem, params, opt


def _snapshot(opt: SOAP, params) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in params]
    for p in params:
        tensors += [v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return tensors


def _adamw_state(params, problem):
    adamw = torch.optim.AdamW(params)
    problem.loss(params, 0).backward()
    adamw.step()
    return adamw.state_dict()


def _reference_state(problem):
    params = problem.make_params()
    ref = ReferenceSOAP(params, lr=1e-2)
    for step in range(2):
        ref.zero_grad()
        problem.loss(params, step).backward()
        ref.step()
    return ref.state_dict()


def _foreign_and_broken(opt, params, problem):
    good = copy.deepcopy(opt.state_dict())
    no_factor = copy.deepcopy(good)
    del no_factor["state"][0]["factor_0"]
    wrong_shape = copy.deepcopy(good)
    wrong_shape["state"][0]["exp_avg"] = torch.zeros(3, 3)
    no_keys = copy.deepcopy(good)
    del no_keys["param_groups"][0]["precondition_frequency"]
    bad_lr = copy.deepcopy(good)
    bad_lr["param_groups"][0]["lr"] = float("nan")
    partial = copy.deepcopy(good)
    partial["state"].pop(1)  # one block's state missing while the other's is there
    fewer = copy.deepcopy(good)
    fewer["param_groups"][0]["params"] = fewer["param_groups"][0]["params"][:1]
    return {
        "torch AdamW": (_adamw_state(problem.make_params(), problem), "lacks SOAP's hyper"),
        "reference SOAP": (_reference_state(problem), "lacks"),
        "missing factor": (no_factor, "lacks ['factor_0']"),
        "wrong shape": (wrong_shape, "should have shape (6, 6)"),
        "missing group key": (no_keys, "precondition_frequency"),
        "nan lr": (bad_lr, "lr must be"),
        "one block missing": (partial, "none for 1 block"),
        "fewer params": (fewer, "has 1 parameters"),
        "not a state dict": ({"state": {}}, "'state' and 'param_groups'"),
        "entry not a dict": ({**good, "state": {0: [1, 2]}}, "must be a dict"),
    }


def test_refused_state_dicts_leave_the_optimizer_unchanged_and_stepping():
    problem, params, opt = _trained()
    cases = _foreign_and_broken(opt, params, problem)
    groups_before = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )
    before = _snapshot(opt, params)
    twin_problem, twin_params, twin = _trained()
    for name, (state_dict, message) in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            opt.load_state_dict(state_dict)
        after = _snapshot(opt, params)
        assert all(torch.equal(a, b) for a, b in zip(before, after)), name
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        assert groups == groups_before, name
    # still steps, exactly like an optimizer that never saw the bad state dicts
    _train(opt, params, problem, 3, start=3)
    _train(twin, twin_params, twin_problem, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


def test_round_trip_continues_exactly():
    problem, params, opt = _trained()
    saved = copy.deepcopy(opt.state_dict())
    copy_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = SOAP(copy_params, lr=1e-2, precondition_frequency=2)
    resumed.load_state_dict(saved)
    _train(opt, params, problem, 4, start=3)
    _train(resumed, copy_params, problem, 4, start=3)
    assert all(torch.equal(a, b) for a, b in zip(params, copy_params))


def test_load_hooks_see_the_full_state_and_run_around_the_load():
    problem, params, opt = _trained()
    saved = copy.deepcopy(opt.state_dict())
    fresh = SOAP(problem.make_params(), lr=1e-2, precondition_frequency=2)
    seen = []

    def pre_hook(optimizer, state_dict):
        seen.append(("pre", sorted(state_dict["state"])))
        changed = copy.deepcopy(state_dict)
        changed["state"][0]["step"] = 99  # a pre-hook's returned state dict is the one loaded
        return changed

    def post_hook(optimizer):
        seen.append(("post", optimizer.state[optimizer.param_groups[0]["params"][0]]["step"]))

    fresh.register_load_state_dict_pre_hook(pre_hook)
    fresh.register_load_state_dict_post_hook(post_hook)
    fresh.load_state_dict(saved)
    assert seen == [("pre", [0, 1]), ("post", 99)]


@pytest.mark.parametrize(
    "saved_dtype,loaded_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_state_follows_the_parameters_dtype(saved_dtype, loaded_dtype):
    problem = RegressionProblem(SHAPES)
    params = problem.make_params(saved_dtype)
    opt = SOAP(params, lr=1e-2, precondition_frequency=2)
    _train(opt, params, problem, 3)
    loaded_params = problem.make_params(loaded_dtype)
    loaded = SOAP(loaded_params, lr=1e-2, precondition_frequency=2)
    loaded.load_state_dict(opt.state_dict())
    _train(loaded, loaded_params, problem, 3, start=3)  # crashed with mixed dtypes before
    for p in loaded_params:
        for key, value in loaded.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == loaded_dtype, key


def test_moment_dtype_of_the_optimizer_wins():
    problem, params, opt = _trained(moment_dtype=torch.bfloat16)
    fresh_params = problem.make_params()
    fresh = SOAP(fresh_params, lr=1e-2, precondition_frequency=2)  # fp32 moments
    fresh.load_state_dict(opt.state_dict())
    for p in fresh_params:
        assert fresh.state[p]["exp_avg"].dtype == torch.float32
        assert fresh.state[p]["exp_avg_sq"].dtype == torch.float32
    _train(fresh, fresh_params, problem, 2, start=3)
