"""The Triton rotated-Adam kernel against the torch definition (interpreter on CPU in CI)."""

import pytest
import torch
from distsoap.kernels import rotated_adam_direction_torch
from distsoap.kernels import rotated_adam_triton as triton_kernel  # noqa: E402 (dev extra: triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32 math on both sides; the kernel may fuse multiply-adds the torch ops round separately
TOLERANCE = {torch.float32: dict(rtol=2e-6, atol=1e-7), torch.bfloat16: dict(rtol=8e-3, atol=1e-5)}


def _inputs(shape, moment_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen)
    m = torch.randn(shape, generator=gen).to(moment_dtype)
    v = torch.rand(shape, generator=gen).to(moment_dtype)
    return (t.to(DEVICE) for t in (m, v, g))


@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5, 7), (1, 1000003)])
def test_matches_torch_definition(shape, moment_dtype):
    m1, v1, g = _inputs(shape, moment_dtype)
    m2, v2 = m1.clone(), v1.clone()
    scale = torch.linspace(-0.5, -1.5, shape[0], device=DEVICE)
    want = rotated_adam_direction_torch(m1, v1, g, 0.9, 0.99, 1e-8, scale)
    got = triton_kernel.rotated_adam_direction_triton(m2, v2, g, 0.9, 0.99, 1e-8, scale)
    tol = TOLERANCE[moment_dtype]
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(m2.float(), m1.float(), **tol)
    torch.testing.assert_close(v2.float(), v1.float(), **tol)


def test_non_contiguous_inputs_and_scalar_scale():
    m1, v1, g = _inputs((4, 6, 10), torch.float32, seed=1)
    m1, v1, g = m1.transpose(1, 2), v1.transpose(1, 2), g.transpose(1, 2)
    m2, v2 = m1.clone(), v1.clone()  # clone keeps the transposed strides
    assert not m2.is_contiguous()
    want = rotated_adam_direction_torch(m1, v1, g, 0.95, 0.95, 1e-8, 0.25)
    got = triton_kernel.rotated_adam_direction_triton(m2, v2, g, 0.95, 0.95, 1e-8, 0.25)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
    torch.testing.assert_close(m2, m1, **TOLERANCE[torch.float32])  # written back in place
    torch.testing.assert_close(v2, v1, **TOLERANCE[torch.float32])


def test_rejects_unsupported_dtypes():
    m, v, g = _inputs((2, 3), torch.float32)
    with pytest.raises(ValueError, match="fp32 gradients"):
        triton_kernel.rotated_adam_direction_triton(m, v, g.double(), 0.9, 0.9, 1e-8, 1.0)
    with pytest.raises(ValueError, match="moments must be one of"):
        triton_kernel.rotated_adam_direction_triton(m.half(), v, g, 0.9, 0.9, 1e-8, 1.0)


def test_wide_index_path_matches_torch_definition(monkeypatch):
    # the int64-offset variant, forced on a small bucket (a real one needs 2^31 elements)
    monkeypatch.setattr(triton_kernel, "INT32_SAFE_ELEMENTS", 0)
    assert triton_kernel.needs_wide_index(1)
    m1, v1, g = _inputs((3, 5, 71), torch.bfloat16, seed=2)
    m2, v2 = m1.clone(), v1.clone()
    scale = torch.tensor([-0.1, -0.2, -0.3], device=DEVICE)
    want = rotated_adam_direction_torch(m1, v1, g, 0.9, 0.99, 1e-8, scale)
    got = triton_kernel.rotated_adam_direction_triton(m2, v2, g, 0.9, 0.99, 1e-8, scale)
    tol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(m2.float(), m1.float(), **tol)
    torch.testing.assert_close(v2.float(), v1.float(), **tol)


def test_buckets_of_two_billion_elements_take_int64_offsets():
    # int32 offsets wrap at 2^31; the last program's masked tail reaches one BLOCK further
    largest_block = 65536
    assert not triton_kernel.needs_wide_index(2**31 - 1 - largest_block)
    assert triton_kernel.needs_wide_index(2**31 - largest_block)
    assert triton_kernel.needs_wide_index(320 * 2560 * 3072)  # 320 stacked 2560x3072 blocks
    assert not triton_kernel.needs_wide_index(48 * 768 * 3072)  # GPT-2 small's MLP, 4 copies
