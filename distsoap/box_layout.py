"""Where each piece of a DTensor lives, for any placement: FSDP2 over tensor parallel and beyond.

:class:`~distsoap.sharding.ShardLayout` covers parameters cut along one dim (FSDP2, HSDP, FSDP1,
DeepSpeed). Tensor parallelism adds more: a parameter sharded on several mesh dims (rowwise
TP under FSDP2: ``(Shard(0), Shard(1))``), or twice on one dim, the second time strided (colwise
TP under FSDP2: ``(_StridedShard(0, sf=2), Shard(0))``: a rank's rows are not contiguous). In
every such layout a rank holds a *box*: per tensor dim, a list of global indices (all of them
for a dim nobody shards), and its local tensor is the full tensor indexed by those lists.

The lists come from DTensor itself: the same per-placement computation, left to right over the
mesh dims, that DTensor uses for a rank's local shape and offset
(``torch.distributed.tensor._utils._get_shard_size_and_offsets``), so a placement DTensor
understands needs no code here. Each rank checks the result against its own local tensor's
shape, and the boxes of distinct pieces must cover the tensor exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

Box = tuple[tuple[int, ...], ...]
"""Per tensor dim, the global indices a rank holds, in the order of its local tensor."""


def held_box(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: list[int], placements
) -> Box:
    """The box the rank at ``coordinate`` of a mesh holds of a tensor of ``shape``.

    Raises:
        ValueError: a placement that is neither a shard nor a replica (a ``Partial`` parameter).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets
    from torch.distributed.tensor.placement_types import _StridedShard

    offsets: dict[int, torch.Tensor] = {}
    sizes = list(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, (Shard, _StridedShard)):
            raise ValueError(f"SOAP cannot step a parameter with placement {placement}")
        dim = placement.dim
        size, index = _get_shard_size_and_offsets(
            sizes[dim],
            mesh_shape[mesh_dim],
            coordinate[mesh_dim],
            placement,
            offsets.get(dim),
            shape[dim],
            False,
        )
        sizes[dim] = size
        offsets[dim] = index[:size] if size else index[:0]  # an empty piece: no index at all
    return tuple(
        tuple(int(i) for i in offsets[d].tolist()) if d in offsets else tuple(range(shape[d]))
        for d in range(len(shape))
    )


def _as_index(indices: tuple[int, ...], dim: int, ndim: int) -> torch.Tensor:
    """``indices`` as an int64 tensor shaped to broadcast along ``dim`` of ``ndim`` dims."""
    view = [1] * ndim
    view[dim] = len(indices)
    return torch.tensor(indices, dtype=torch.int64).view(view)


@dataclass(frozen=True)
class BoxLayout:
    """How one parameter is spread over the ranks of a group, each rank holding a box.

    Same interface as :class:`~distsoap.sharding.ShardLayout`, used by the lossless sharded
    strategy.
    """

    full_shape: tuple[int, ...]
    """Shape of the whole parameter (what SOAP preconditions)."""
    boxes: tuple[Box, ...]
    """Per group rank, the box it holds."""

    pieces_concatenate = False
    """Pieces are boxes, not ranges of the flattened parameter: assembled one by one."""

    @cached_property
    def piece_numels(self) -> tuple[int, ...]:
        """Per group rank, the number of elements of its piece."""
        return tuple(math.prod(len(ix) for ix in box) for box in self.boxes)

    def numel(self, rank: int) -> int:
        """Elements of ``rank``'s piece."""
        return self.piece_numels[rank]

    def piece_key(self, rank: int) -> object:
        """Equal for two ranks exactly when they hold the same non-empty piece."""
        return self.boxes[rank] if self.piece_numels[rank] else ("empty", rank)

    @cached_property
    def _holders(self) -> list[tuple[int, ...]]:
        """Per distinct non-empty piece, in rank order of first holder, the ranks holding it."""
        by_box: dict[Box, list[int]] = {}
        for rank, box in enumerate(self.boxes):
            if self.piece_numels[rank]:
                by_box.setdefault(box, []).append(rank)
        return [tuple(ranks) for ranks in by_box.values()]

    def sources(self, owner: int) -> tuple[int, ...]:
        """The ranks whose pieces make up the whole parameter for ``owner``, one per piece.

        A piece several ranks hold (a replicated mesh dim) comes from one of them, chosen by
        the owner's rank so that owners spread the sending over the copies.
        """
        return tuple(holders[owner % len(holders)] for holders in self._holders)

    @cached_property
    def _indices(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        ndim = len(self.full_shape)
        return tuple(
            tuple(_as_index(ix, d, ndim) for d, ix in enumerate(box)) for box in self.boxes
        )

    @cached_property
    def _indices_by_device(self) -> dict[torch.device, tuple[tuple[torch.Tensor, ...], ...]]:
        return {}

    def _indices_on(self, device: torch.device, rank: int) -> tuple[torch.Tensor, ...]:
        """``rank``'s index tensors on ``device``, copied there once (not every step)."""
        cached = self._indices_by_device.get(device)
        if cached is None:
            cached = tuple(tuple(i.to(device) for i in box) for box in self._indices)
            self._indices_by_device[device] = cached
        return cached[rank]

    def _box_shape(self, rank: int) -> tuple[int, ...]:
        return tuple(len(ix) for ix in self.boxes[rank])

    def assemble(self, pieces: list[torch.Tensor], owner: int) -> torch.Tensor:
        """The whole parameter from the flat pieces of ``sources(owner)``, in that order."""
        whole = pieces[0].new_empty(self.full_shape)
        for rank, piece in zip(self.sources(owner), pieces, strict=True):
            whole[self._indices_on(whole.device, rank)] = piece.view(self._box_shape(rank))
        return whole

    def extract(self, whole: torch.Tensor, rank: int) -> torch.Tensor:
        """``rank``'s piece of a whole-parameter tensor, flattened."""
        if not self.piece_numels[rank]:
            return whole.new_empty(0)
        return whole[self._indices_on(whole.device, rank)].reshape(-1)

    def check_tiles(self) -> None:
        """Raise ValueError unless the distinct pieces cover the parameter exactly once.

        Boxes are products of index sets, so two overlap exactly when their sets intersect in
        every dim; pieces that do not overlap and add up to the parameter's size tile it.
        """
        boxes = [self.boxes[holders[0]] for holders in self._holders]
        sets = [[set(ix) for ix in box] for box in boxes]
        repeated = any(len(set(ix)) != len(ix) for box in boxes for ix in box)
        overlap = any(
            all(a & b for a, b in zip(sets[i], sets[j]))
            for i in range(len(sets))
            for j in range(i + 1, len(sets))
        )
        total = sum(math.prod(len(ix) for ix in box) for box in boxes)
        if repeated or overlap or total != math.prod(self.full_shape):
            raise ValueError(
                f"the pieces of a DTensor parameter of shape {self.full_shape} do not cover it "
                "exactly once; SOAP cannot assemble it"
            )
