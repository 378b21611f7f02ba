"""The adaptive refresh: a due refresh is skipped while the bases still diagonalise the factors."""

from __future__ import annotations

import pytest
import torch

from distsoap import SOAP
from distsoap.engine.update import refresh_rows
from distsoap.math.adaptive import off_diagonal_mass, off_diagonal_mass_of_products
from distsoap.math.bases import basis_products
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


def _factors_and_bases(batch: int, d: int, seed: int = 0, nudge: float = 0.3):
    """PSD factors and, per row, an orthonormal basis near (not at) its eigenvectors."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, d, 3 * d, generator=gen, dtype=torch.float64)
    factor = a @ a.mT
    nudged = factor + nudge * factor.diagonal(dim1=1, dim2=2).mean() * torch.randn(
        batch, d, d, generator=gen, dtype=torch.float64
    )
    basis = torch.linalg.qr(torch.linalg.eigh(nudged + nudged.mT).eigenvectors)[0]
    return factor, basis


def test_the_mass_from_the_refresh_products_equals_the_definition():
    """The fast path (GG Q only) against the readable reference (Q^T GG Q)."""
    factor, basis = _factors_and_bases(4, 12)
    product = basis_products([factor], [basis])
    fast = off_diagonal_mass_of_products([factor], [basis], product)
    exact = off_diagonal_mass([factor], [basis], torch.float64)
    assert exact.min() > 1e-3  # the bases are off, so the comparison means something
    torch.testing.assert_close(fast, exact, rtol=1e-10, atol=1e-12)  # fp64, one identity apart


@pytest.mark.parametrize("nudge", [0.3, 0.01])
def test_the_mass_from_products_with_bf16_bases_stays_near_the_definition(nudge):
    """Bases stored in bf16 are orthonormal to 0.3%; the Rayleigh quotients absorb most of it."""
    factor, basis = _factors_and_bases(4, 64, seed=1, nudge=nudge)
    factor, basis = factor.float(), basis.float().bfloat16().float()
    fast = off_diagonal_mass_of_products([factor], [basis], basis_products([factor], [basis]))
    exact = off_diagonal_mass([factor], [basis])
    assert exact.min() > 1e-3
    # measured (seeds 0-4, d 16-256): at most 1.8e-4 apart on masses of 0.2 and 1.5e-5 on
    # masses of 0.0025; without the quotients' division it is of the order of 0.0024
    assert (fast - exact).abs().max() < 5e-4


def test_the_mass_from_products_of_zero_and_non_finite_factors():
    zero = torch.zeros(1, 3, 3)
    eye = torch.eye(3).expand(1, 3, 3)
    assert off_diagonal_mass_of_products([zero], [eye], [zero]).item() == 0.0
    bad = torch.full((1, 3, 3), float("nan"))
    assert off_diagonal_mass_of_products([bad], [eye], [bad]).isnan().all()
    assert off_diagonal_mass_of_products([None], [None], [None]) is None


def _stack(factor: torch.Tensor, basis: torch.Tensor, shape: tuple[int, int]):
    gen = torch.Generator().manual_seed(3)
    batch = factor.shape[0]
    return {
        "exp_avg": torch.randn(batch, *shape, generator=gen, dtype=factor.dtype),
        "exp_avg_sq": torch.rand(batch, *shape, generator=gen, dtype=factor.dtype),
        "factor_0": factor.clone(),
        "basis_0": basis.clone(),
    }


def test_a_skipped_row_is_untouched_and_the_others_refresh_as_without_the_test():
    factor, basis = _factors_and_bases(3, 8)
    basis[1] = torch.linalg.eigh(factor[1]).eigenvectors.flip(-1)  # row 1 is still diagonal
    shape = (8, 5)
    tensors = _stack(factor, basis, shape)
    seen = []

    def refresh_the_off_diagonal(mass):
        seen.append(mass)
        return (mass >= 1e-6).nonzero().flatten().tolist()

    done = refresh_rows(tensors, [0, 1, 2], 2, torch.float64, None, None, refresh_the_off_diagonal)
    assert done.refreshed == [0, 2] and seen[0][1] < 1e-20
    plain = _stack(factor, basis, shape)
    refresh_rows(plain, [0, 2], 2, torch.float64)  # the same rows, no test
    for key, value in tensors.items():
        # the same operations, but on a stack of 3 rows against one of 2: a batched product's
        # rounding may depend on the batch size (it does on an AMD EPYC), so fp64 to 1e-12
        torch.testing.assert_close(
            value[[0, 2]], plain[key][[0, 2]], rtol=1e-12, atol=1e-12, msg=key
        )
        assert torch.equal(value[1], _stack(factor, basis, shape)[key][1]), key  # untouched


def test_the_mass_of_a_padded_block_is_that_of_its_real_part():
    """The refresh's factors read -1 on the padding; the test must see the stored zeros."""
    real, basis_real = _factors_and_bases(2, 6, seed=4)
    factor = torch.zeros(2, 8, 8, dtype=torch.float64)
    factor[:, :6, :6] = real
    basis = torch.eye(8, dtype=torch.float64).repeat(2, 1, 1)
    basis[:, :6, :6] = basis_real
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 6:] = True
    seen = []
    refresh_rows(
        _stack(factor, basis, (8, 3)),
        [0, 1],
        2,
        torch.float64,
        None,
        [mask, None],
        lambda mass: seen.append(mass) or [0, 1],
    )
    exact = off_diagonal_mass([real], [basis_real], torch.float64)
    torch.testing.assert_close(seen[0], exact, rtol=1e-10, atol=1e-12)  # fp64 identities
