"""torch's Adam-family options: ``maximize`` and ``lr`` as a 1-element tensor."""

import pytest
import torch

from distsoap import SOAP
from distsoap.checks.consistency import optimizer_fingerprint
from tests.problems import RegressionProblem

SHAPES = [(16, 16), (16, 16), (12, 40), (8, 6, 3, 3), (32,), ()]
KWARGS = dict(precondition_frequency=3, max_precond_dim=32, weight_decay=0.1)
STEPS = 10  # the first call and three refreshes


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _run(opt: SOAP, params: list[torch.Tensor], sign: float = 1.0, scheduler=None) -> None:
    for step in range(STEPS):
        for p, g in zip(params, _grads(step)):
            p.grad = sign * g
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _params() -> list[torch.nn.Parameter]:
    return RegressionProblem(SHAPES).make_params()


@pytest.mark.parametrize(
    "options", [{}, dict(normalize_grads=True), dict(precondition_1d=True, merge_dims=True)]
)
def test_maximize_equals_stepping_on_the_negated_gradient(options):
    maximizing, negated = _params(), _params()
    opt = SOAP(maximizing, lr=1e-2, maximize=True, **KWARGS, **options)
    reference = SOAP(negated, lr=1e-2, **KWARGS, **options)
    _run(opt, maximizing)
    _run(reference, negated, sign=-1.0)
    assert opt.param_groups[0]["maximize"] is True
    for p, q in zip(maximizing, negated):
        assert torch.equal(p.detach(), q.detach())
        for key, value in reference.state[q].items():  # moments, factors and bases too
            mine = opt.state[p][key]
            assert torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value
    # the caller's gradients are left as they were
    assert all(torch.equal(p.grad, g) for p, g in zip(maximizing, _grads(STEPS - 1)))


def test_maximize_is_a_param_group_option():
    first, second = _params(), _params()
    opt = SOAP([{"params": first}, {"params": second, "maximize": True}], lr=1e-2, **KWARGS)
    assert [g["maximize"] for g in opt.param_groups] == [False, True]
    assert opt.defaults["maximize"] is False
    gen_a, gen_b = _params(), _params()
    reference = SOAP(gen_a + gen_b, lr=1e-2, **KWARGS)
    for step in range(STEPS):
        grads = _grads(step)
        for p, q, g in zip(first, gen_a, grads):
            p.grad, q.grad = g, g.clone()
        for p, q, g in zip(second, gen_b, grads):
            p.grad, q.grad = g, -g
        opt.step()
        reference.step()
    for p, q in zip(first + second, gen_a + gen_b):
        assert torch.equal(p.detach(), q.detach())


def test_tensor_lr_equals_float_lr():
    # an fp64 tensor holds 1e-2 exactly as the float does (an fp32 one would round it)
    with_tensor, with_float = _params(), _params()
    lr = torch.tensor(1e-2, dtype=torch.float64)
    opt = SOAP(with_tensor, lr=lr, **KWARGS)
    _run(opt, with_tensor)
    _run(SOAP(with_float, lr=1e-2, **KWARGS), with_float)
    assert opt.param_groups[0]["lr"] is lr
    for p, q in zip(with_tensor, with_float):
        assert torch.equal(p.detach(), q.detach())


def test_one_element_tensor_lr_of_shape_1():
    param = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([param], lr=torch.tensor([0.5]))
    for _ in range(3):
        param.grad = torch.randn(4, 4)
        opt.step()
    assert torch.isfinite(param).all()


SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.7**s),
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=STEPS
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_drive_a_tensor_lr(name):
    with_tensor, with_float = _params(), _params()
    lr = torch.tensor(1e-2, dtype=torch.float64)
    opt = SOAP(with_tensor, lr=lr, **KWARGS)
    reference = SOAP(with_float, lr=1e-2, **KWARGS)
    _run(opt, with_tensor, scheduler=SCHEDULERS[name](opt))
    _run(reference, with_float, scheduler=SCHEDULERS[name](reference))
    assert opt.param_groups[0]["lr"] is lr  # updated in place by the scheduler
    assert float(lr) == reference.param_groups[0]["lr"] != 1e-2
    for p, q in zip(with_tensor, with_float):
        assert torch.equal(p.detach(), q.detach())


def test_fingerprint_compares_tensor_lrs_by_value_not_by_printout():
    def fingerprint(lr):
        return optimizer_fingerprint(SOAP([torch.nn.Parameter(torch.ones(2))], lr=lr), "ddp", None)

    base = fingerprint(torch.tensor(1e-2))
    assert fingerprint(torch.tensor(1e-2)) == base
    assert fingerprint(torch.tensor(1.00001e-2)) != base  # both print as tensor(0.0100)
    assert fingerprint(torch.tensor(1e-2, dtype=torch.float64)) != base  # another value
