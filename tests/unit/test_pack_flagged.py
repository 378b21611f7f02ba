"""comm.pack_flagged against the layout it promises (per block its flag, then its values), and
unpack_flagged reading it back."""

import pytest
import torch

from distsoap.comm import pack_flagged, unpack_flagged
from distsoap.testing.op_count import CountOps


def _expected(blocks, dtype):
    out = []
    for flag, values, numel in blocks:
        out.append(torch.tensor([flag], dtype=dtype))
        out.append(torch.zeros(numel, dtype=dtype) if values is None else values.reshape(-1))
    return torch.cat(out).to(dtype)


@pytest.mark.parametrize(
    "flags", [(1.0, 1.0, 1.0, 1.0), (1.0, 0.0, 3.0, 1.0)], ids=["same", "mixed"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_layout_flags_values_and_missing_blocks(flags, dtype):
    gen = torch.Generator().manual_seed(0)
    values = [
        torch.randn(3, 4, generator=gen),
        None,  # no values: numel zeros
        torch.randn(5, generator=gen).double(),  # rounded to the buffer's dtype
        torch.randn(4, 6, generator=gen).t(),  # non-contiguous
    ]
    numels = [12, 2, 5, 24]
    blocks = list(zip(flags, values, numels))
    got = pack_flagged(blocks, dtype, torch.device("cpu"))
    assert got.dtype == dtype
    assert torch.equal(got, _expected(blocks, dtype))


def test_same_flags_are_filled_on_the_device_not_copied_from_the_host():
    blocks = [(1.0, torch.ones(3), 3), (1.0, torch.ones(2, 2), 4)]
    with CountOps() as counter:
        pack_flagged(blocks, torch.float32, torch.device("cpu"))
    assert counter.host_tensors == 0  # on a GPU a host tensor is a synchronous copy
    with CountOps() as counter:
        pack_flagged([(1.0, None, 3), (0.0, None, 2)], torch.float32, torch.device("cpu"))
    assert counter.host_tensors == 1  # differing flags: one copy for all of them


def test_no_blocks_is_an_empty_buffer():
    assert pack_flagged([], torch.float32, torch.device("cpu")).numel() == 0


def test_unpack_reads_back_what_pack_laid_out_for_every_peer():
    gen = torch.Generator().manual_seed(1)
    peers = [
        [(1.0, torch.randn(2, 3, generator=gen), 6), (0.0, None, 4)],
        [],  # a peer that sends nothing
        [(3.0, torch.randn(5, generator=gen), 5)],
    ]
    buffers = [pack_flagged(blocks, torch.float32, torch.device("cpu")) for blocks in peers]
    splits = [[n for _, _, numel in blocks for n in (1, numel)] for blocks in peers]
    with CountOps() as counter:
        flags, pieces = unpack_flagged(buffers, splits)
    assert counter.count == 1  # one concatenation of every peer's flags (splits are views)
    assert flags == [[1.0, 0.0], [], [3.0]]
    for blocks, got in zip(peers, pieces):
        assert len(got) == len(blocks)
        for (_, values, numel), piece in zip(blocks, got):
            want = torch.zeros(numel) if values is None else values.reshape(-1)
            assert torch.equal(piece, want)
