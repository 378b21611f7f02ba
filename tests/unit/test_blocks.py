import pytest
import torch

from distsoap.engine.blocks import make_block_spec, merge_shape


# Expected shapes worked out by hand from the rule in docs/algorithm.md ("Shapes").
@pytest.mark.parametrize(
    "shape, max_dim, expected",
    [
        ((3, 4, 5), 100, (60,)),
        ((4, 4, 6, 6), 16, (16, 6, 6)),
        ((2, 20000, 3), 100, (2, 20000, 3)),
        ((20000, 5), 10000, (20000, 5)),
        ((5, 1), 4, (5,)),
        ((1, 10), 100, (10,)),
        ((1, 1), 100, (1,)),
        ((64, 3, 3, 3), 64, (64, 27)),
    ],
)
def test_merge_shape(shape, max_dim, expected):
    assert merge_shape(shape, max_dim) == expected


def _spec(shape, **kw):
    opts = dict(max_precond_dim=10000, merge_dims=False, precondition_1d=False)
    opts.update(kw)
    opts.setdefault("data_format", "channels_first")
    return make_block_spec(shape, **opts)


def test_factored_dims():
    assert _spec((30, 20)).factored == (True, True)
    assert _spec((30, 20), max_precond_dim=25).factored == (False, True)
    assert _spec((7,)).factored == (False,)
    assert _spec((7,), precondition_1d=True).factored == (True,)
    assert _spec((7,), precondition_1d=True, max_precond_dim=6).factored == (False,)
    assert _spec(()).factored == ()


def test_channels_last_only_with_merge_dims():
    # the reference permutes NHWC -> NCHW inside its merge step only
    assert not _spec((2, 3, 3, 4), data_format="channels_last").channels_last
    spec = _spec((2, 3, 3, 4), data_format="channels_last", merge_dims=True, max_precond_dim=9)
    assert spec.channels_last
    assert spec.block_shape == (8, 9)  # NCHW (2,4,3,3) merged: 2*4=8 | 3*3=9


def test_block_round_trip_and_layout():
    spec = _spec((2, 3, 3, 4), data_format="channels_last", merge_dims=True, max_precond_dim=9)
    x = torch.randn(2, 3, 3, 4)
    block = spec.to_block(x)
    assert torch.equal(block, x.permute(0, 3, 1, 2).reshape(8, 9))
    assert torch.equal(spec.from_block(block), x)


def test_unknown_data_format():
    with pytest.raises(ValueError, match="channels_first"):
        _spec((2, 2), data_format="nhwc")
