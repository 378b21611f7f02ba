"""The rotated-Adam elementwise kernel against the literal formula of docs/algorithm.md (3-5)."""

import pytest
import torch
from distsoap.kernels import rotated_adam_direction


def _literal(m, v, g, beta1, beta2, eps, scale):
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return m, v, scale * m / (v.sqrt() + eps)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 4, 3), (1, 1000003)])
def test_matches_formula_fp64(shape):
    gen = torch.Generator().manual_seed(0)
    m, g = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.rand(shape, generator=gen, dtype=torch.float64)
    scale = torch.linspace(-1, -2, shape[0], dtype=torch.float64)
    want_m, want_v, want = _literal(
        m, v, g, 0.9, 0.99, 1e-6, scale.view(-1, *[1] * (len(shape) - 1))
    )
    got = rotated_adam_direction(m, v, g, 0.9, 0.99, 1e-6, scale)
    tol = dict(rtol=1e-14, atol=1e-15)  # fp64, a different but equivalent operation order
    torch.testing.assert_close(m, want_m, **tol)
    torch.testing.assert_close(v, want_v, **tol)
    torch.testing.assert_close(got, want, **tol)


def test_bf16_moments_updated_in_fp32():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(4, 33, generator=gen)
    m = torch.randn(4, 33, generator=gen).to(torch.bfloat16)
    v = torch.rand(4, 33, generator=gen).to(torch.bfloat16)
    want_m, want_v, want = _literal(m.float(), v.float(), g, 0.95, 0.95, 1e-8, 0.5)
    got = rotated_adam_direction(m, v, g, 0.95, 0.95, 1e-8, 0.5)
    assert m.dtype == v.dtype == torch.bfloat16 and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # fp32 math from the same inputs
    # rounded once, so exact: both sides do the same elementwise fp32 operations in the same
    # order (no BLAS, no reduction, no fused multiply-add in torch's CPU kernels, checked under
    # ATEN_CPU_CAPABILITY=default/avx2/avx512), then one bf16 rounding
    torch.testing.assert_close(m, want_m.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(v, want_v.to(torch.bfloat16), rtol=0, atol=0)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3, 8, 6, generator=gen, dtype=torch.float64)
    g = base.transpose(1, 2)  # (3, 6, 8), not contiguous
    m = torch.zeros(3, 6, 8, dtype=torch.float64).transpose(1, 2).transpose(1, 2)
    v = torch.ones(3, 8, 6, dtype=torch.float64).transpose(1, 2)
    want_m, want_v, want = _literal(m.clone(), v.clone(), g, 0.9, 0.9, 1e-8, 1.0)
    got = rotated_adam_direction(m, v, g, 0.9, 0.9, 1e-8, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(v, want_v, rtol=1e-14, atol=1e-15)
