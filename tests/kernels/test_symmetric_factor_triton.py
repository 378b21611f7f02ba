"""The one-triangle Triton factor update against torch's baddbmm (interpreter on CPU in CI)."""

import numpy as np
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


def test_depends_only_on_the_lower_triangle():
    # the upper triangle of the old factor is never kept (NaN there would spread): the result is
    # the update of the symmetric factor its lower triangle stands for
    factor, g = _inputs(2, 70, 20, torch.float32, seed=2)  # 3x3 tiles: diagonal and off
    want = factor.clone()
    update_factors([want], g, 0.9)
    upper = torch.ones(70, 70, dtype=torch.bool, device=DEVICE).triu(1)
    got = factor.masked_fill(upper, float("nan"))
    triton_kernel.symmetric_factor_update_triton(got, g, 0.9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # as test_matches_baddbmm
    assert torch.equal(got, got.mT)


@pytest.mark.skipif(DEVICE == "cuda", reason="replaces the interpreter's tl.dot")
def test_symmetric_whatever_the_product_rounding(monkeypatch):
    # A product G_i G_i^T whose computed tile is not bitwise symmetric, as a BLAS kernel or a
    # tensor core may sum in a different order for (i, j) and (j, i): here each tile product is
    # nudged by one part in 1e6 above its diagonal. The stored factor must still be exactly
    # symmetric: symmetric by construction, not by the luck of the sum order.
    from triton.runtime import interpreter

    exact_dot = interpreter.InterpreterBuilder.create_dot
    skewed = []

    def skewed_dot(self, a, b, d, *args):
        skewed.append(1)
        out = exact_dot(self, a, b, d, *args)
        out.data = out.data + np.triu(np.abs(out.data), 1).astype(out.data.dtype) * 1e-6
        return out

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", skewed_dot)
    factor, g = _inputs(2, 70, 20, torch.float32, seed=4)
    want = factor.clone()
    update_factors([want], g, 0.9)
    got = factor.clone()
    triton_kernel.symmetric_factor_update_triton(got, g, 0.9)
    assert skewed  # the kernel's products did go through the skewed tl.dot
    # the nudge is 1e-6 relative, under the sum-order tolerance of test_matches_baddbmm
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, got.mT)


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


def test_wide_index_path_matches_baddbmm(monkeypatch):
    # the int64-offset variant, forced on small factors (real ones need 2^31-element offsets)
    monkeypatch.setattr(triton_kernel, "INT32_MAX", 0)
    factor, g = _inputs(3, 33, 20, torch.bfloat16, seed=3)
    assert triton_kernel.needs_wide_index(factor, g)
    want = factor.clone()
    update_factors([want], g.float(), 0.9)
    got = factor.clone()
    triton_kernel.symmetric_factor_update_triton(got, g, 0.9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # as test_matches_baddbmm
    assert torch.equal(got, got.mT)


def test_offsets_past_int32_take_int64_indexing():
    # meta tensors: the shapes and strides of real buckets, no memory
    def meta(*shape):
        return torch.empty(shape, device="meta")

    small_factor, small_grad = meta(48, 768, 768), meta(48, 768, 3072)
    assert not triton_kernel.needs_wide_index(small_factor, small_grad)
    # 320 stacked 2560x3072 gradients: the last batch starts at 319 * 7.9M > 2^31
    assert triton_kernel.needs_wide_index(meta(320, 2560, 2560), meta(320, 2560, 3072))
    # few elements in all, but a strided view whose row stride times d passes 2^31
    strided = meta(1, 2**31).as_strided((1, 2, 2), (0, 2**31 - 1, 1))
    assert triton_kernel.needs_wide_index(strided, meta(1, 2, 3))
    assert not triton_kernel.needs_wide_index(meta(0, 5, 5), meta(0, 5, 7))
