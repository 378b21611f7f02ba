"""The adaptive refresh: a due refresh is skipped while the bases still diagonalise the factors."""

from __future__ import annotations

import pytest
import torch

from distsoap import SOAP
from distsoap.math.adaptive import off_diagonal_mass
from tests.problems import RegressionProblem, relative_difference

SHAPES = [(16, 16), (24, 24), (12, 40), (32,)]
OPTIONS = dict(lr=1e-2, precondition_frequency=2, max_precond_dim=32, precondition_1d=True)


def _run(steps: int, dtype=torch.float64, **options):
    problem = RegressionProblem(SHAPES, dtype=dtype)
    params = problem.make_params()
    opt = SOAP(params, **{**OPTIONS, **options})
    bases = []
    for step in range(steps):
        opt.zero_grad()
        problem.loss(params, step).backward()
        opt.step()
        bases.append(opt.state[params[0]]["basis_0"].clone())
    return params, opt, bases, problem


def test_the_mass_is_zero_for_eigenvectors_and_not_for_another_basis():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, 20, generator=gen, dtype=torch.float64)
    factor = a @ a.mT
    eigenvectors = torch.linalg.eigh(factor).eigenvectors
    assert off_diagonal_mass([factor], [eigenvectors], torch.float64).max() < 1e-20
    identity = torch.eye(8, dtype=torch.float64).expand(3, 8, 8)
    assert off_diagonal_mass([factor], [identity], torch.float64).min() > 0.05
    assert off_diagonal_mass([None], [None]) is None


def test_zero_tolerance_is_the_aligned_schedule():
    """The default never measures: the same operations as every refresh taken."""
    plain, _, _, _ = _run(9)
    explicit, opt, _, _ = _run(9, refresh_tolerance=0.0, max_skipped_refreshes=3)
    for a, b in zip(plain, explicit):
        assert torch.equal(a, b)
    assert all(s["skipped_refreshes"] == 0 for s in opt.state.values())


def test_skips_are_bounded_so_an_always_diagonal_basis_refreshes_every_third_time():
    """Tolerance above any mass, at most 2 skips in a row: a refresh every 3 x 2 updates.

    That is the aligned schedule with precondition_frequency 6: the same operations, since a
    skipped refresh changes no state but its counters.
    """
    adaptive, opt, bases, _ = _run(14, refresh_tolerance=1.5, max_skipped_refreshes=2)
    every_sixth, _, _, _ = _run(14, precondition_frequency=6)
    for a, b in zip(adaptive, every_sixth):
        assert torch.equal(a, b)
    changed = [i for i in range(1, len(bases)) if not torch.equal(bases[i], bases[i - 1])]
    assert changed == [6, 12]  # updates t = 6 and 12 (step index = t; step 0 was the first call)
    state = opt.state[adaptive[0]]
    assert state["skipped_refreshes"] == 4 and state["refresh_skips"] == 0  # t=2, 4, 8, 10


def test_a_real_tolerance_skips_some_refreshes_and_stays_close():
    reference, _, _, problem = _run(40, dtype=torch.float32)
    got, opt, _, _ = _run(40, dtype=torch.float32, refresh_tolerance=1e-3)
    skipped = sum(s["skipped_refreshes"] for s in opt.state.values())
    assert 0 < skipped < 80  # of 4 blocks x 20 due refreshes: measured 25 skipped
    # measured: parameters 0.029 apart (they move by about 0.5), held loss 0.2% lower; bounds 2x
    assert relative_difference(got, reference) < 0.06
    loss, ref_loss = problem.loss(got, 10_000), problem.loss(reference, 10_000)
    assert abs(loss - ref_loss) < 0.01 * ref_loss


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"refresh_tolerance": -1e-3}, "refresh_tolerance must be a real number >= 0"),
        ({"refresh_tolerance": float("inf")}, "refresh_tolerance must be a real number >= 0"),
        ({"max_skipped_refreshes": -1}, "max_skipped_refreshes must be an integer >= 0"),
        ({"max_skipped_refreshes": 1.5}, "max_skipped_refreshes must be an integer >= 0"),
    ],
)
def test_invalid_adaptive_options_name_the_valid_range(options, message):
    with pytest.raises(ValueError, match=message):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2))], **options)
