"""Numerical faults: non-finite gradients and failing eigendecompositions (single process)."""

import logging

import pytest
import torch

from distsoap import SOAP
from distsoap.faults import FaultPolicy, NumericalFaultError
from tests.problems import RegressionProblem

SHAPES = [(16, 16), (12, 12), (8, 6, 3, 3), (32,)]
BAD_STEP, BAD_BLOCK = 7, 1


def _run(corrupt: str, **kwargs):
    """Train 15 steps; at BAD_STEP block BAD_BLOCK's gradient is replaced ("nan", "inf") or
    removed ("none")."""
    problem = RegressionProblem(SHAPES, dtype=torch.float64)
    params = problem.make_params()
    opt = SOAP(params, lr=1e-2, precondition_frequency=4, **kwargs)
    for step in range(15):
        for p in params:
            p.grad = None
        problem.loss(params, step).backward()
        if step == BAD_STEP:
            grad = params[BAD_BLOCK].grad
            if corrupt == "none":
                params[BAD_BLOCK].grad = None
            else:
                grad[3, 5] = float("nan") if corrupt == "nan" else float("inf")
        opt.step()
    return params, opt


@pytest.mark.parametrize("corrupt", ["nan", "inf"])
def test_nonfinite_gradient_skips_only_that_block(corrupt, caplog):
    with caplog.at_level(logging.WARNING, logger="distsoap"):
        params, opt = _run(corrupt)
    expected, expected_opt = _run("none")  # the same block simply had no gradient that step
    for got, want in zip(params, expected):
        assert torch.equal(got, want)
    state, want_state = opt.state[params[BAD_BLOCK]], expected_opt.state[expected[BAD_BLOCK]]
    for key, value in want_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key
    assert state["step"] == want_state["step"]
    assert state["nonfinite_skips"] == 1
    assert opt.state[params[0]]["nonfinite_skips"] == 0
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == 1


def test_nonfinite_warning_is_rate_limited(caplog):
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([p])
    with caplog.at_level(logging.WARNING, logger="distsoap"):
        for _ in range(5):
            p.grad = torch.full((4, 4), float("nan"))
            opt.step()
    assert opt.state[p]["nonfinite_skips"] == 5
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == 1


def test_nonfinite_raise_mode_names_the_parameter():
    problem = RegressionProblem(SHAPES)
    params = problem.make_params()
    names = [f"block{i}" for i in range(len(params))]
    opt = SOAP(list(zip(names, params)), nonfinite_grads="raise")
    problem.loss(params, 0).backward()
    opt.step()
    for p in params:
        p.grad = None
    problem.loss(params, 1).backward()
    params[2].grad[0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in params]
    with pytest.raises(NumericalFaultError, match="'block2'"):
        opt.step()
    assert torch.equal(params[2].detach(), before[2])  # the faulty block is untouched
    assert not torch.equal(params[0].detach(), before[0])  # the others took their step


def test_invalid_fault_options():
    with pytest.raises(ValueError, match="nonfinite_grads must be one of"):
        SOAP([torch.nn.Parameter(torch.randn(2))], nonfinite_grads="ignore")
    with pytest.raises(ValueError, match="max_basis_failures must be an integer >= 1"):
        SOAP([torch.nn.Parameter(torch.randn(2))], max_basis_failures=0)


def _failing(real, fails_when):
    def fake(matrix, *args, **kwargs):
        if fails_when(matrix):
            raise torch.linalg.LinAlgError("forced failure")
        return real(matrix, *args, **kwargs)

    return fake


def test_eigh_failure_in_fp32_is_retried_in_fp64(monkeypatch):
    fake = _failing(torch.linalg.eigh, lambda m: m.dtype == torch.float32)
    monkeypatch.setattr(torch.linalg, "eigh", fake)
    problem = RegressionProblem([(16, 16)])
    params = problem.make_params()
    opt = SOAP(params)
    problem.loss(params, 0).backward()
    opt.step()
    state = opt.state[params[0]]
    assert state["bases_ready"] and state["basis_failures"] == 0
    q = state["basis_0"]
    torch.testing.assert_close(q.T @ q, torch.eye(16), atol=1e-5, rtol=0)  # fp32 orthogonal


def test_eigh_failing_every_retry_discards_the_first_call_then_raises(monkeypatch):
    monkeypatch.setattr(torch.linalg, "eigh", _failing(torch.linalg.eigh, lambda m: True))
    p = torch.nn.Parameter(torch.randn(6, 6))
    opt = SOAP(list(zip(["w"], [p])), max_basis_failures=3)
    for attempt in (1, 2):
        p.grad = torch.randn(6, 6)
        opt.step()
        state = opt.state[p]
        assert not state["bases_ready"] and state["basis_failures"] == attempt
        assert torch.equal(state["factor_0"], torch.zeros(6, 6))  # never a basis from it
    p.grad = torch.randn(6, 6)
    with pytest.raises(NumericalFaultError, match="eigenbasis of parameter 'w' failed 3 times"):
        opt.step()


def test_qr_failure_keeps_the_previous_basis(monkeypatch):
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = SOAP([p], precondition_frequency=2, max_basis_failures=2)
    for _ in range(2):  # first call + update 1: bases from eigh
        p.grad = torch.randn(8, 8)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}

    real_q = torch.linalg.householder_product  # how the refresh's QR forms Q

    def nan_q(reflections, tau):
        return real_q(reflections, tau) * float("nan")

    monkeypatch.setattr(torch.linalg, "householder_product", nan_q)
    p.grad = torch.randn(8, 8)
    opt.step()  # update 2 is a refresh step: QR fails every retry
    state = opt.state[p]
    assert state["basis_failures"] == 1
    assert torch.equal(state["basis_0"], before["basis_0"])
    assert torch.equal(state["basis_1"], before["basis_1"])
    assert torch.isfinite(p).all()
    monkeypatch.setattr(torch.linalg, "householder_product", real_q)
    for _ in range(2):  # the next refresh (update 4) succeeds and resets the count
        p.grad = torch.randn(8, 8)
        opt.step()
    assert state["basis_failures"] == 0
    assert not torch.equal(state["basis_0"], before["basis_0"])


def test_non_finite_factor_never_produces_a_basis():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = SOAP([p], precondition_frequency=1, max_basis_failures=2)
    for _ in range(2):
        p.grad = torch.randn(8, 8)
        opt.step()
    basis = opt.state[p]["basis_0"].clone()
    opt.state[p]["factor_0"][0, 0] = float("inf")  # corrupted state
    p.grad = torch.randn(8, 8)
    opt.step()
    assert torch.equal(opt.state[p]["basis_0"], basis)
    assert opt.state[p]["basis_failures"] == 1


def test_finiteness_check_is_exact_for_every_dtype_and_overflow():
    """The fused-norm check answers exactly what ``torch.isfinite(g).all()`` answers."""
    fp16_big = torch.full((3, 3), 60000.0, dtype=torch.float16)  # finite; its norm is not
    nan, inf = float("nan"), float("inf")
    cases = {
        "fp32": torch.randn(5, 4),
        "fp32_nan": torch.tensor([1.0, nan, 2.0]),
        "fp32_neg_inf": torch.tensor([[-inf, 0.0]]),
        "fp64_inf": torch.tensor([inf], dtype=torch.float64),
        "bf16": torch.randn(7, dtype=torch.bfloat16),
        "bf16_nan": torch.tensor([nan, 1.0], dtype=torch.bfloat16),
        "fp16_big": fp16_big,
        "fp16_big_inf": torch.cat([fp16_big.flatten(), torch.tensor([inf], dtype=torch.float16)]),
        "empty": torch.zeros(0, 3),
        "strided_nan": torch.tensor([[1.0, nan], [2.0, 3.0]]).mT,
    }
    grads = {i: g for i, g in enumerate(cases.values())}
    got = FaultPolicy.finite(grads)
    want = {i: bool(torch.isfinite(g).all()) for i, g in grads.items()}
    assert got == want
    assert [got[i] for i in range(len(cases))].count(False) == 6  # the check can fail
