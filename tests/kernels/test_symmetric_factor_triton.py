"""The one-triangle Triton factor update against torch's baddbmm (interpreter on CPU in CI)."""

import pytest
import torch
from distsoap.kernels import symmetric_factor_triton as triton_kernel  # dev extra: triton

from distsoap.math.rotations import update_factors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch, d, r, grad_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, d, r, generator=gen).to(grad_dtype)
    previous = torch.randn(batch, d, 2 * d + 1, generator=gen)
    factor = previous @ previous.mT / (2 * d + 1)  # positive definite,
    factor = (factor + factor.mT) / 2  # and exactly symmetric, as SOAP's factors start (zero)
    return factor.to(DEVICE), g.to(DEVICE)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "batch, d, r",
    [(1, 1, 1), (2, 7, 5), (3, 33, 70), (1, 64, 64), (2, 100, 9)],  # 1-, 2-, 4-tile triangles
)
def test_matches_baddbmm(batch, d, r, grad_dtype):
    factor, g = _inputs(batch, d, r, grad_dtype)
    want = factor.clone()
    update_factors([want], g.float(), 0.95)
    got = factor.clone()
    triton_kernel.symmetric_factor_update_triton(got, g, 0.95)
    # both fp32 products of the same bf16-exact or fp32 inputs; only the order of the sums
    # differs (r terms of magnitude ~1): a few ulps of the entries
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, got.mT)  # exactly symmetric: the upper triangle is the mirror


def test_non_contiguous_factor_is_updated_in_place():
    factor, g = _inputs(4, 40, 12, torch.float32, seed=1)
    want = factor.clone()
    update_factors([want], g, 0.8)
    storage = factor.transpose(0, 1).contiguous()  # (d, B, d): the factor is a strided view
    view = storage.transpose(0, 1)
    assert not view.is_contiguous()
    triton_kernel.symmetric_factor_update_triton(view, g.mT.contiguous().mT, 0.8)
    torch.testing.assert_close(view, want, rtol=1e-5, atol=1e-5)


def test_rejects_bad_inputs():
    factor, g = _inputs(1, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="fp32 factors"):
        triton_kernel.symmetric_factor_update_triton(factor.double(), g, 0.9)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        triton_kernel.symmetric_factor_update_triton(factor, g.half(), 0.9)
    with pytest.raises(ValueError, match="factor of shape"):
        triton_kernel.symmetric_factor_update_triton(factor[:, :3, :3], g, 0.9)
