"""Rank-deficient factors (1-D with precondition_1d, non-square matrices).

Their eigenbases are arbitrary inside the factors' null space, so two correct implementations
part ways over a trajectory (docs/algorithm.md). They are held to the reference one step at a time:
before every step SOAP's state is copied into the reference, both take the same gradient, and
everything that does not depend on that arbitrary choice must agree.
"""

import pytest
import torch

from distsoap import SOAP, ReferenceSOAP

TOL = 1e-12  # fp64, one step from identical state: summation order only


def _copy_state(soap, ref, p_soap, p_ref):
    s = soap.state[p_soap]
    rank = s["exp_avg"].dim()
    ref.state[p_ref] = {
        "step": s["step"],
        "precondition_frequency": s["precondition_frequency"],
        "shampoo_beta": s["shampoo_beta"],
        "exp_avg": s["exp_avg"].clone(),
        "exp_avg_sq": s["exp_avg_sq"].clone(),
        "factors": [s[f"factor_{i}"].clone() if f"factor_{i}" in s else None for i in range(rank)],
        "bases": [s[f"basis_{i}"].clone() if f"basis_{i}" in s else None for i in range(rank)],
    }
    with torch.no_grad():
        p_ref.copy_(p_soap)


@pytest.mark.parametrize(
    "shape, kwargs",
    [((24,), dict(precondition_1d=True)), ((6, 20), {}), ((20, 6, 2), {})],
    ids=["vector_precondition_1d", "wide_matrix", "tall_tensor"],
)
def test_each_step_matches_reference(shape, kwargs):
    gen = torch.Generator().manual_seed(0)
    p_soap = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
    p_ref = torch.nn.Parameter(p_soap.detach().clone())
    soap = SOAP([p_soap], lr=1e-2, precondition_frequency=4, **kwargs)
    ref = ReferenceSOAP([p_ref], lr=1e-2, precondition_frequency=4, **kwargs)
    for step in range(13):
        grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        if step > 0:
            _copy_state(soap, ref, p_soap, p_ref)
        p_soap.grad, p_ref.grad = grad.clone(), grad.clone()
        soap.step()
        ref.step()
        torch.testing.assert_close(p_soap.detach(), p_ref.detach(), rtol=TOL, atol=TOL)
        s, r = soap.state[p_soap], ref.state[p_ref]
        for i, factor in enumerate(r["factors"]):
            if factor is not None:
                torch.testing.assert_close(s[f"factor_{i}"], factor, rtol=TOL, atol=TOL)
        refreshed = s["step"] > 0 and s["step"] % 4 == 0
        if step > 0 and not refreshed:  # no new basis, so no arbitrary choice
            torch.testing.assert_close(s["exp_avg"], r["exp_avg"], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(s["exp_avg_sq"], r["exp_avg_sq"], rtol=TOL, atol=TOL)
        for i, basis in enumerate(r["bases"]):
            if basis is not None:
                q = s[f"basis_{i}"]
                eye = torch.eye(q.shape[0], dtype=q.dtype)
                torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-10)
