"""The torch.optim.Optimizer contract: state dicts, schedulers, closures, missing gradients."""

import copy
import io

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from distsoap import SOAP
from tests.problems import RegressionProblem

SHAPES = [(16, 16), (16, 16), (8, 6, 3, 3), (12, 40), (32,), ()]


def _skip(step):  # one block of the shared bucket misses some steps
    return {1} if step % 4 == 1 else set()


def _run(problem, opt, params, start, stop):
    for step in range(start, stop):
        for p in params:
            p.grad = None
        problem.loss(params, step, _skip(step)).backward()
        opt.step()


KWARGS = dict(lr=1e-2, precondition_frequency=7, max_precond_dim=32)


def _trained(steps: int):
    """The problem, its parameters and a SOAP optimizer after ``steps`` steps."""
    problem = RegressionProblem(SHAPES)
    params = problem.make_params()
    opt = SOAP(params, **KWARGS)
    _run(problem, opt, params, 0, steps)
    return problem, params, opt


def test_state_dict_round_trip_continues_bit_for_bit():
    _, params, _ = _trained(50)
    uninterrupted = [p.detach().clone() for p in params]

    problem, params, opt = _trained(23)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    del opt
    buffer.seek(0)
    saved = torch.load(buffer)
    params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    fresh = SOAP(params, **KWARGS)
    fresh.load_state_dict(saved["opt"])
    _run(problem, fresh, params, 23, 50)
    for got, want in zip(params, uninterrupted):
        assert torch.equal(got.detach(), want)


def test_load_state_dict_keeps_fp32_state_for_bf16_params():
    p = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.bfloat16))
    opt = SOAP([p])
    for _ in range(3):
        p.grad = torch.randn(8, 8, dtype=torch.bfloat16)
        opt.step()
    state = opt.state_dict()
    fresh = SOAP([p])
    fresh.load_state_dict(state)
    loaded = fresh.state[p]
    for key in ("factor_0", "basis_1", "exp_avg", "exp_avg_sq"):
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], opt.state[p][key])
        assert loaded[key].data_ptr() != opt.state[p][key].data_ptr()  # a copy, not an alias


def _lr_history_run(scheduler_factory, steps=12):
    problem = RegressionProblem([(16, 16), (32,)])
    params = problem.make_params()
    opt = SOAP(params, lr=1e-2)
    scheduler = scheduler_factory(opt) if scheduler_factory else None
    used = []
    for step in range(steps):
        for p in params:
            p.grad = None
        problem.loss(params, step).backward()
        used.append((opt.param_groups[0]["lr"], tuple(opt.param_groups[0]["betas"])))
        opt.step()
        if scheduler:
            scheduler.step()
    return [p.detach().clone() for p in params], used


def _manual_run(used):
    problem = RegressionProblem([(16, 16), (32,)])
    params = problem.make_params()
    opt = SOAP(params, lr=1e-2)
    for step, (lr, betas) in enumerate(used):
        for p in params:
            p.grad = None
        problem.loss(params, step).backward()
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[0]["betas"] = betas
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    "factory",
    [
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.7**s),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12),
    ],
    ids=["LambdaLR", "OneCycleLR"],
)
def test_schedulers_change_the_lr_used(factory):
    scheduled, used = _lr_history_run(factory)
    constant, _ = _lr_history_run(None)
    assert len({lr for lr, _ in used}) > 5  # the scheduler really moved the lr
    assert any(not torch.allclose(a, b) for a, b in zip(scheduled, constant))
    for a, b in zip(scheduled, _manual_run(used)):
        assert torch.equal(a, b)


def test_closure_is_called_and_its_gradients_used():
    problem = RegressionProblem([(16, 16)])
    p1, p2 = problem.make_params(), problem.make_params()
    o1, o2 = SOAP(p1), SOAP(p2)
    for step in range(5):

        def closure(step=step):
            o1.zero_grad()
            loss = problem.loss(p1, step)
            loss.backward()
            return loss

        loss = o1.step(closure)
        o2.zero_grad()
        want = problem.loss(p2, step)
        want.backward()
        o2.step()
        assert torch.equal(loss.detach(), want.detach())
    assert torch.equal(p1[0].detach(), p2[0].detach())


def test_params_without_grad_are_skipped():
    a = torch.nn.Parameter(torch.randn(8, 8))
    b = torch.nn.Parameter(torch.randn(8, 8))
    before = b.detach().clone()
    opt = SOAP([a, b], lr=0.1)
    for _ in range(3):
        a.grad = torch.randn(8, 8)
        opt.step()
    assert torch.equal(b.detach(), before)
    assert len(opt.state[b]) == 0
    assert opt.state[a]["step"] == 2


def test_add_param_group():
    a = torch.nn.Parameter(torch.randn(8, 8))
    b = torch.nn.Parameter(torch.randn(6, 6))
    opt = SOAP([a], lr=0.1)
    opt.add_param_group({"params": [b], "lr": 0.5, "precondition_frequency": 2})
    assert opt.param_groups[1]["betas"] == (0.95, 0.95)  # defaults filled in
    before = b.detach().clone()
    for _ in range(4):
        a.grad, b.grad = torch.randn(8, 8), torch.randn(6, 6)
        opt.step()
    assert not torch.equal(b.detach(), before)
    assert opt.state[b]["precondition_frequency"] == 2
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": -1.0})
    assert len(opt.param_groups) == 2  # the rejected group was not kept


def _zero_step(opt, params):
    """What torch DCP's _init_optim_state does: zero grads, lr 0, one step, restore lr."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    for p in params:
        p.grad = None


def test_zero_gradient_first_step_creates_state_and_changes_nothing():
    problem = RegressionProblem(SHAPES)
    params = problem.make_params()
    opt = SOAP(params, lr=1e-2, max_precond_dim=32)
    _zero_step(opt, params)
    for p, w in zip(params, problem.make_params()):
        assert torch.equal(p.detach(), w.detach())

    # every key that a trained state holds exists already
    trained_params = problem.make_params()
    trained = SOAP(trained_params, lr=1e-2, max_precond_dim=32)
    _run(problem, trained, trained_params, 0, 3)
    for p, q in zip(params, trained_params):
        assert set(opt.state[p]) == set(trained.state[q])

    # ...and training from there equals training a fresh optimizer: no frozen zero basis
    _run(problem, opt, params, 0, 30)
    fresh_params = problem.make_params()
    fresh = SOAP(fresh_params, lr=1e-2, max_precond_dim=32)
    _run(problem, fresh, fresh_params, 0, 30)
    for a, b in zip(params, fresh_params):
        assert torch.equal(a.detach(), b.detach())


def test_dcp_get_optimizer_state_dict_on_fresh_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    before = [p.detach().clone() for p in model.parameters()]
    opt = SOAP(model.parameters(), lr=1e-2)
    state = get_optimizer_state_dict(model, opt)
    assert "basis_0" in state["state"]["0.weight"]
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert not opt.state[model[0].weight]["bases_ready"]


def test_load_state_dict_into_a_live_optimizer_continues_from_the_loaded_state():
    """Loading replaces the state the next steps use (the cached step plans included)."""
    problem, params, opt = _trained(12)
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    _run(problem, opt, params, 12, 30)  # the live optimizer moves on, plans cached

    with torch.no_grad():
        for p, value in zip(params, saved_params):
            p.copy_(value)
    opt.load_state_dict(saved)
    _run(problem, opt, params, 12, 20)

    fresh_params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    fresh = SOAP(fresh_params, **KWARGS)
    fresh.load_state_dict(copy.deepcopy(saved))
    _run(problem, fresh, fresh_params, 12, 20)
    for got, want in zip(params, fresh_params):
        assert torch.equal(got.detach(), want.detach())
    assert opt.state[params[0]]["step"] == 19  # 12 calls saved (the first makes no update) + 8
