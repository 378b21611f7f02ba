"""``block_size``: large dims cut into blocks, each block SOAP on its own."""

from __future__ import annotations

import pytest
import torch

from distsoap import SOAP
from distsoap.engine.blocks import join_blocks, layout_signature, make_block_spec, split_blocks
from distsoap.math.reference import ReferenceSOAP

ROWS = ((0, 4), (4, 8), (8, 10))  # 10 in 3 blocks of 4, the last padded by 2
COLS = ((0, 4), (4, 7))  # 7 in 2 blocks of 4, the last padded by 1


def _spec(shape, **options):
    base = dict(
        max_precond_dim=10_000,
        merge_dims=False,
        precondition_1d=False,
        data_format="channels_first",
    )
    return make_block_spec(shape, **{**base, **options})


def test_blocks_are_equal_sized_and_as_few_as_the_size_allows():
    spec = _spec((1000, 300), block_size=256)
    assert spec.grid == (4, 2) and spec.block_shape == (250, 150) and spec.rows == 8
    assert spec.state_numel == 1000 * 300  # no padding needed
    spec = _spec((10, 7), block_size=4)
    assert spec.grid == (3, 2) and spec.block_shape == (4, 4) and spec.state_numel == 96
    assert not _spec((10, 7), block_size=10).blocked  # nothing above the size
    assert not _spec((50,), block_size=8).blocked  # 1-D: plain Adam, nothing to block
    assert _spec((50,), block_size=8, precondition_1d=True).grid == (7,)


def test_split_and_join_are_inverse_and_pad_with_zeros():
    x = torch.randn(2, 10, 7)
    blocks = split_blocks(x, (3, 2), (4, 4))
    assert blocks.shape == (12, 4, 4)
    torch.testing.assert_close(blocks[1], torch.nn.functional.pad(x[0, 0:4, 4:7], [0, 1]))
    assert torch.equal(blocks[6 + 4][:2, :], x[1, 8:10, 0:4])  # matrix 1, block (2, 0)
    assert torch.count_nonzero(blocks[4][2:]) == 0  # padding rows of block (2, 0)
    assert torch.equal(join_blocks(blocks, (3, 2), (4, 4), (10, 7)), x)


def test_padding_masks_mark_the_padded_indices():
    rows, cols = _spec((10, 7), block_size=4).padding()
    assert rows.shape == cols.shape == (6, 4)
    assert rows[4].tolist() == [False, False, True, True]  # block (2, 0)
    assert not rows[:4].any()
    assert cols[1].tolist() == [False, False, False, True]  # block (0, 1)


def _blocked_vs_separate(shape, steps=8, **options):
    """SOAP with block_size=4 on one parameter, and the reference on its blocks as parameters."""
    gen = torch.Generator().manual_seed(0)
    whole = torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))
    cuts = [(r, c) for r in ROWS for c in COLS]
    pieces = [
        torch.nn.Parameter(whole.detach()[r0:r1, c0:c1].clone()) for (r0, r1), (c0, c1) in cuts
    ]
    opt = SOAP([whole], block_size=4, precondition_frequency=2, **options)
    reference = ReferenceSOAP(pieces, precondition_frequency=2, **options)
    for _ in range(steps):
        whole.grad = torch.randn(whole.shape, generator=gen, dtype=torch.float64)
        for p, ((r0, r1), (c0, c1)) in zip(pieces, cuts):
            p.grad = whole.grad[r0:r1, c0:c1].clone()
        opt.step()
        reference.step()
    return whole, pieces, opt


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1, "normalize_grads": True}])
def test_blocked_parameter_equals_the_reference_on_its_blocks(options):
    """Uneven blocks (4x4, 4x3, 2x4, 2x3 real parts, padded to 4x4), 3 refreshes.

    A first gradient leaves a non-square block's larger factor rank-deficient; where its null
    space is one-dimensional (4x3, and 2x3, whose padded 4x4 factor also holds padding) the
    eigenvectors are unique up to sign and the trajectories must agree. The 2x4 block's 4x4
    factor has a 2-D null space whose eigenvectors are arbitrary (docs/algorithm.md): it is
    compared by the loose bound only.
    """
    whole, pieces, opt = _blocked_vs_separate((10, 7), **options)
    cuts = [(r, c) for r in ROWS for c in COLS]
    for p, ((r0, r1), (c0, c1)) in zip(pieces, cuts):
        got = whole.detach()[r0:r1, c0:c1]
        if (r1 - r0, c1 - c0) == (2, 4):
            torch.testing.assert_close(got, p.detach(), rtol=0, atol=0.05)
            continue
        # fp64; a padded block's decomposition differs from its real part's by rounding only
        torch.testing.assert_close(got, p.detach(), rtol=0, atol=1e-10)
    state = opt.state[whole]
    assert state["factor_0"].shape == (6, 4, 4) and state["exp_avg"].shape == (6, 4, 4)
    # the padding never gets a gradient, a moment or a factor entry
    assert torch.count_nonzero(state["exp_avg"][4:, 2:, :]) == 0
    assert torch.count_nonzero(state["factor_0"][4:, 2:, :]) == 0


def test_block_size_is_a_layout_setting_checkpoints_must_agree_on():
    whole, _, opt = _blocked_vs_separate((10, 7), steps=2)
    other = SOAP([torch.nn.Parameter(whole.detach().clone())])
    with pytest.raises(ValueError, match="block_size"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_invalid_block_size_names_the_valid_range(bad):
    with pytest.raises(ValueError, match="block_size must be None"):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2))], block_size=bad)


def test_padding_stays_out_of_the_eigenbases_of_a_rank_deficient_real_part():
    """A 3x3 real part of rank 2, padded to 5x5: the zero eigenvalue is shared with the padding.

    With the padding's diagonal shifted below every real eigenvalue, the first basis and every
    refreshed one keep the padding coordinates to themselves: no basis vector mixes a real and
    a padded coordinate (so no gradient is ever rotated into the padding).
    """
    from distsoap.engine.blocking import shifted_for_padding
    from distsoap.math.bases import initial_basis, refresh_bases

    gen = torch.Generator().manual_seed(1)
    g = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    factor = torch.zeros(1, 5, 5, dtype=torch.float64)
    factor[0, :3, :3] = g @ g.T
    mask = torch.tensor([[False, False, False, True, True]])
    (shifted,) = shifted_for_padding([factor], [mask])
    basis, failed = initial_basis(shifted)
    assert not failed
    real, pad = basis[0, :3, :], basis[0, 3:, :]
    mixed = (real.abs().sum(0) > 1e-12) & (pad.abs().sum(0) > 1e-12)
    assert not mixed.any()  # each basis vector is real or padding, never both
    assert pad[:, 3:].abs().sum() > 1.9  # the padding's vectors are sorted last
    new_bases, _, _ = refresh_bases([shifted], [basis], torch.ones(1, 5, dtype=torch.float64))
    real, pad = new_bases[0][0, :3, :], new_bases[0][0, 3:, :]
    assert not ((real.abs().sum(0) > 1e-12) & (pad.abs().sum(0) > 1e-12)).any()


def test_blocks_share_a_bucket_with_parameters_of_the_block_shape():
    """An (8, 8) cut into four 4 x 4 blocks and a plain (4, 4): one bucket of 5 rows."""
    gen = torch.Generator().manual_seed(0)
    big = torch.nn.Parameter(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    small = torch.nn.Parameter(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    pieces = [
        torch.nn.Parameter(big.detach()[r : r + 4, c : c + 4].clone())
        for r in (0, 4)
        for c in (0, 4)
    ]
    copy = torch.nn.Parameter(small.detach().clone())
    opt = SOAP([big, small], block_size=4, precondition_frequency=2)
    reference = ReferenceSOAP([*pieces, copy], precondition_frequency=2)
    for _ in range(6):
        big.grad = torch.randn(8, 8, generator=gen, dtype=torch.float64)
        small.grad = torch.randn(4, 4, generator=gen, dtype=torch.float64)
        for p, (r, c) in zip(pieces, [(r, c) for r in (0, 4) for c in (0, 4)]):
            p.grad = big.grad[r : r + 4, c : c + 4].clone()
        copy.grad = small.grad.clone()
        opt.step()
        reference.step()
    buckets = list(opt.engine._buckets.values())
    assert len(buckets) == 1 and len(buckets[0]) == 5
    for p, (r, c) in zip(pieces, [(r, c) for r in (0, 4) for c in (0, 4)]):
        torch.testing.assert_close(
            big.detach()[r : r + 4, c : c + 4], p.detach(), rtol=0, atol=1e-10
        )
    torch.testing.assert_close(small.detach(), copy.detach(), rtol=0, atol=1e-10)


def test_a_spec_holding_some_blocks_sees_exactly_those_rows():
    whole = _spec((37, 20), block_size=8)  # 5 x 3 blocks of (8, 7), the last ones padded
    rows = (0, 4, 13, 14)
    held = whole.holding(rows)
    assert (held.rows, held.full_rows, held.state_shape) == (4, 15, (4, 8, 7))
    grad = torch.randn(37, 20)
    picked = whole.to_rows(grad)[list(rows)]
    assert torch.equal(held.to_rows(picked), picked)  # row form in, row form out
    assert torch.equal(held.from_rows(picked), picked)
    for mine, full in zip(held.padding(), whole.padding(), strict=True):
        assert torch.equal(mine, full[list(rows)])
    assert layout_signature(held) == layout_signature(whole) + " rows=0,4,13-14"
    with pytest.raises(ValueError, match="take tensors of shape"):
        held.to_rows(grad)  # a parameter-shaped tensor is not row form
    with pytest.raises(ValueError, match="distinct, sorted and below 15"):
        whole.holding((3, 2))
    assert held.whole() == whole
