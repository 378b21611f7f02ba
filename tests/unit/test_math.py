"""The batched math against per-block loops of the readable reference's own operations."""

import pytest
import torch

from distsoap.math.bases import initial_basis, nonfinite_rows, q_factor, refresh_bases
from distsoap.math.reference import ReferenceSOAP, _contract
from distsoap.math.rotations import rotate_in, rotate_out, update_factors

TOL = 1e-12  # fp64: different summation orders only

SHAPES = [
    ((5, 7), (True, True)),
    ((5, 7), (False, True)),
    ((3, 4, 5), (True, False, True)),
    ((6,), (True,)),
    ((2, 3, 4, 5), (True, True, True, True)),
]


def _orthogonal(batch, d, gen):
    q, _ = torch.linalg.qr(torch.randn(batch, d, d, generator=gen, dtype=torch.float64))
    return q


def _setup(shape, factored, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
    bases = [_orthogonal(batch, d, gen) if f else None for d, f in zip(shape, factored)]
    return x, bases, gen


@pytest.mark.parametrize("shape, factored", SHAPES)
def test_rotations_match_tensordot(shape, factored):
    x, bases, _ = _setup(shape, factored)
    for out, fn in ((False, rotate_in), (True, rotate_out)):
        got = fn(x, bases)
        for b in range(x.shape[0]):
            want = _contract(x[b], [q[b] if q is not None else None for q in bases], out=out)
            torch.testing.assert_close(got[b], want, rtol=TOL, atol=TOL)
    # out undoes in
    torch.testing.assert_close(rotate_out(rotate_in(x, bases), bases), x, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape, factored", SHAPES)
def test_factor_update_matches_reference(shape, factored):
    x, _, gen = _setup(shape, factored)
    factors = [
        torch.randn(x.shape[0], d, d, generator=gen, dtype=torch.float64) if f else None
        for d, f in zip(shape, factored)
    ]
    factors = [f @ f.mT if f is not None else None for f in factors]
    expected = [f.clone() if f is not None else None for f in factors]
    update_factors(factors, x, 0.9)
    for b in range(x.shape[0]):
        state = {
            "factors": [f[b].clone() if f is not None else None for f in expected],
            "shampoo_beta": 0.9,
        }
        ReferenceSOAP._update_factors(state, x[b])
        for got, want in zip(factors, state["factors"]):
            if got is not None:
                torch.testing.assert_close(got[b], want, rtol=TOL, atol=TOL)


def test_initial_basis_descending_eigenvectors():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    factor = a @ a.mT
    q, failed = initial_basis(factor)
    assert failed == []
    for b in range(4):
        want = ReferenceSOAP._eigh(factor[b])
        # eigenvectors are unique up to sign for distinct eigenvalues
        torch.testing.assert_close((q[b] * want).sum(0).abs(), torch.ones(6, dtype=torch.float64))
        eig = torch.diag(q[b].T @ factor[b] @ q[b])
        assert torch.all(eig[:-1] >= eig[1:])


@pytest.mark.parametrize("shape, factored", SHAPES)
def test_refresh_matches_reference(shape, factored):
    x, bases, gen = _setup(shape, factored)
    factors = []
    for d, f in zip(shape, factored):
        a = torch.randn(x.shape[0], d, d + 3, generator=gen, dtype=torch.float64)
        factors.append(a @ a.mT if f else None)
    v = x.square()
    new_bases, new_v, failed = refresh_bases(factors, bases, v)
    assert failed == set()
    for b in range(x.shape[0]):
        state = {
            "factors": [f[b] if f is not None else None for f in factors],
            "bases": [q[b] if q is not None else None for q in bases],
            "exp_avg_sq": v[b],
        }
        ReferenceSOAP._refresh(state)
        torch.testing.assert_close(new_v[b], state["exp_avg_sq"], rtol=TOL, atol=TOL)
        for got, want in zip(new_bases, state["bases"]):
            if got is not None:
                torch.testing.assert_close(got[b], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_q_without_r_is_the_q_of_torch_qr(dtype):
    """The refresh's QR skips R; its Q must be torch.linalg.qr's (same reflections)."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(4, 33, 33, generator=gen, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12  # the same LAPACK calls; slack for BLAS paths
    torch.testing.assert_close(q_factor(a), torch.linalg.qr(a)[0], rtol=0, atol=tol)


def test_nonfinite_rows_matches_an_entrywise_check():
    """The one-reduction check of new bases against the readable entry-by-entry one."""
    gen = torch.Generator().manual_seed(0)
    stack = torch.linalg.qr(torch.randn(7, 16, 16, generator=gen))[0]
    stack[1, 3, 4] = float("nan")
    stack[2, 0, 0] = float("inf")
    stack[3, 5, 5] = float("-inf")
    stack[4, 1, 1], stack[4, 2, 2] = float("inf"), float("-inf")  # their sum is NaN
    stack[6, 15, 15] = float("nan")
    reference = (~torch.isfinite(stack).flatten(1).all(dim=1)).nonzero().flatten().tolist()
    assert reference == [1, 2, 3, 4, 6]
    assert nonfinite_rows(stack) == reference
    assert nonfinite_rows(stack[[0, 5]]) == []
