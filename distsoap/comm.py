"""Communication for replicated parameters: owner-aligned buckets over uneven all-to-alls.

A *communication bucket* is a run of trainable parameters (about ``bucket_cap_mb`` of them, in
reverse registration order, which is roughly the order backward produces gradients). Inside a
bucket the payload is laid out owner by owner; each parameter contributes one flag element
followed by its values:

    [ owner 0: (flag, values of p) for p owned by 0 | owner 1: ... | ... ]

Two exchanges use that layout, both one ``all_to_all_single`` with uneven splits, so nothing is
padded and the bytes each rank sends are exactly what the data needs:

- ``reduce``: every rank sends each owner the owner's part of its local gradients; the owner sums
  what it receives. Rank r sends ``N - N_r`` elements (N: bucket size, N_r: r's own part).
- ``gather``: every owner sends its part (the updates) to every rank. Rank r sends
  ``(world - 1) N_r``. Averaged over ranks the two together send ``2 (world - 1) / world * N``:
  the bytes of a ring all-reduce of the same gradients, which is what DDP sends.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist


@dataclass
class CommBucket:
    """One owner-aligned communication bucket."""

    index: int
    """Position in launch order (every rank launches buckets in this order)."""
    dtype: torch.dtype
    """Element type of the gradient payload."""
    owned: list[list[int]]
    """Per rank, the parameter indices it owns in this bucket, in payload order."""
    numels: dict[int, int]
    """Elements of each parameter in the bucket."""
    sizes: list[int] = field(default_factory=list)
    """Per rank, the elements of its part (one flag per parameter plus the values)."""

    def __post_init__(self) -> None:
        self.sizes = [sum(1 + self.numels[index] for index in part) for part in self.owned]

    @property
    def params(self) -> list[int]:
        """Every parameter index in the bucket."""
        return [i for part in self.owned for i in part]

    @cached_property
    def piece_sizes(self) -> list[int]:
        """Sizes of the payload's pieces in order: per parameter its flag (1), its values."""
        return [n for i in self.params for n in (1, self.numels[i])]

    def part_piece_sizes(self, rank: int) -> list[int]:
        """The same for ``rank``'s part alone."""
        return [n for i in self.owned[rank] for n in (1, self.numels[i])]

    @property
    def total(self) -> int:
        """Elements of the whole bucket payload."""
        return sum(self.sizes)


def build_buckets(
    numels: list[int],
    dtypes: list[torch.dtype],
    owners: list[int],
    world_size: int,
    cap_elements: int,
) -> list[CommBucket]:
    """Cut trainable parameters, last first, into buckets of about ``cap_elements`` each.

    Args:
        numels: elements per trainable parameter (in registration order).
        dtypes: gradient dtype per parameter; a bucket holds one dtype.
        owners: owner rank per parameter.
        world_size: number of ranks.
        cap_elements: start a new bucket once this many elements are collected.

    """
    buckets: list[CommBucket] = []
    current: list[int] = []
    size = 0

    def close() -> None:
        nonlocal current, size
        if not current:
            return
        owned: list[list[int]] = [[] for _ in range(world_size)]
        for index in current:
            owned[owners[index]].append(index)
        buckets.append(
            CommBucket(len(buckets), dtypes[current[0]], owned, {i: numels[i] for i in current})
        )
        current, size = [], 0

    for index in reversed(range(len(numels))):
        if current and (dtypes[index] != dtypes[current[0]] or size >= cap_elements):
            close()
        current.append(index)
        size += numels[index]
    close()
    return buckets


class CommStats:
    """Bytes this rank sent, by kind, in the last step and since construction."""

    def __init__(self) -> None:
        self.last_step: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)
        self.steps = 0
        self._current: dict[str, int] = defaultdict(int)

    def add(self, kind: str, nbytes: int) -> None:
        """Count bytes sent for ``kind`` during the current step."""
        self._current[kind] += nbytes
        self.total[kind] += nbytes

    def end_step(self) -> None:
        """Close the current step's counts."""
        self.last_step = defaultdict(int, self._current)
        self._current = defaultdict(int)
        self.steps += 1

    def as_dict(self) -> dict[str, object]:
        """A plain summary for users and benchmarks."""
        return {
            "last_step_bytes": dict(self.last_step),
            "total_bytes": dict(self.total),
            "steps": self.steps,
        }


@dataclass
class PendingExchange:
    """An exchange in flight: wait, then read ``received``."""

    work: dist.Work | None
    received: torch.Tensor

    def wait(self) -> torch.Tensor:
        """Block until the data has arrived and return it."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.received


def launch_reduce(
    bucket: CommBucket,
    send: torch.Tensor,
    rank: int,
    group: dist.ProcessGroup | None,
    stats: CommStats,
) -> PendingExchange:
    """Send each owner its part of ``send`` (laid out as the bucket payload), asynchronously.

    The result, once waited for, holds ``world`` copies of this rank's part, one per source
    rank, in rank order; the owner sums them.
    """
    world = len(bucket.sizes)
    received = send.new_empty(world * bucket.sizes[rank])
    work = dist.all_to_all_single(
        received, send, [bucket.sizes[rank]] * world, bucket.sizes, group=group, async_op=True
    )
    stats.add("grad_sync", (bucket.total - bucket.sizes[rank]) * send.element_size())
    return PendingExchange(work, received)


def launch_gather(
    bucket: CommBucket,
    part: torch.Tensor,
    rank: int,
    group: dist.ProcessGroup | None,
    stats: CommStats,
) -> PendingExchange:
    """Send this rank's part (its owned updates) to every rank, asynchronously.

    The result, once waited for, is the whole bucket payload, every owner's part in rank order.
    """
    world = len(bucket.sizes)
    received = part.new_empty(bucket.total)
    work = dist.all_to_all_single(
        received,
        part.repeat(world),
        bucket.sizes,
        [part.numel()] * world,
        group=group,
        async_op=True,
    )
    stats.add("update_gather", (world - 1) * part.numel() * part.element_size())
    return PendingExchange(work, received)


def pack_flagged(
    blocks: list[tuple[float, torch.Tensor | None, int]],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Lay out ``[flag, values...]`` per block in one new buffer, in the given order.

    One concatenation for the whole buffer, whatever the number of blocks, so packing launches
    no kernel per block. When every flag is the same (every step after the first, faults
    aside) the flags are one ``torch.full`` on the device; otherwise they are copied from the
    host once, which on a GPU waits for the device's queued work.

    Args:
        blocks: per block its flag, its values (any shape; None sends ``numel`` zeros) and
            ``numel``, the number of values.
        dtype: the buffer's dtype; values are rounded to it once, as a copy would.
        device: where the buffer lives.

    Returns:
        The 1-D buffer of ``sum(1 + numel)`` elements.
    """
    out = torch.empty(sum(1 + n for _, _, n in blocks), dtype=dtype, device=device)
    if not blocks:
        return out
    flag_values = [flag for flag, _, _ in blocks]
    if all(value == flag_values[0] for value in flag_values):
        flags = torch.full((len(blocks),), flag_values[0], dtype=dtype, device=device).split(1)
    else:
        flags = torch.tensor(flag_values, dtype=dtype, device=device).split(1)
    zero = torch.zeros((), dtype=dtype, device=device)
    pieces = []
    for flag, (_, values, numel) in zip(flags, blocks):
        pieces.append(flag)
        if values is None:
            values = zero.expand(numel)
        elif values.dim() != 1:  # a reshape of a 1-D tensor would still cost a dispatch
            values = values.reshape(-1)
        pieces.append(values)
    return torch.cat(pieces, out=out)


def unpack_flagged(
    buffers: list[torch.Tensor], splits: list[list[int]]
) -> tuple[list[list[float]], list[tuple[torch.Tensor, ...]]]:
    """Read received :func:`pack_flagged` payloads back: per buffer its flags and its values.

    Args:
        buffers: the payloads (one per peer rank, or a single one).
        splits: per buffer, ``[1, numel, 1, numel, ...]`` of its blocks in order.

    Returns:
        Per buffer, its blocks' flags as floats and their values as flat views. The flags of
        all buffers are read with one concatenation and one copy to the host: on a GPU, one
        device sync however many buffers and blocks.
    """
    cuts = [buffer.split(sizes) if sizes else () for buffer, sizes in zip(buffers, splits)]
    flag_views = [flag for cut in cuts for flag in cut[0::2]]
    values = torch.cat(flag_views).tolist() if flag_views else []
    flags, start = [], 0
    for cut in cuts:
        flags.append(values[start : start + len(cut) // 2])
        start += len(cut) // 2
    return flags, [cut[1::2] for cut in cuts]


def update_flag(has_update: bool, abort: bool) -> float:
    """The flag element sent before a block's update: 1 update / 0 none, plus 2 to stop."""
    return float(has_update) + (2.0 if abort else 0.0)


def read_flag(flag: float) -> tuple[bool, bool]:
    """(whether an update follows, whether its owner must stop training) from a flag."""
    return flag in (1.0, 3.0), flag >= 2.0


def raise_if_aborted(error: str | None, aborting: set[int], rank: int) -> None:
    """Raise on every rank once a step's exchanges are done, if any owner hit a fault."""
    from distsoap.faults import NumericalFaultError

    if error is not None:
        raise NumericalFaultError(error)
    if aborting:
        raise NumericalFaultError(
            f"rank(s) {sorted(aborting)} stopped training on a numerical fault (see the error "
            f"there); rank {rank} stops too so that no rank waits in a collective"
        )
