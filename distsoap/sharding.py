"""Where each piece of a sharded parameter lives: layouts read from DTensor and FSDP1 metadata.

A :class:`ShardLayout` says, for every rank of the group, which contiguous range of a parameter
that rank holds, in a *split view* of the parameter: the parameter itself cut along one dim
(FSDP2's ``Shard(d)``), or the flattened parameter cut into element ranges (FSDP1's flat
shards). Ranks in different *replica groups* hold the same pieces again (HSDP's replicate dim).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

from distsoap.box_layout import BoxLayout, held_box


@dataclass(frozen=True)
class ShardLayout:
    """How one parameter is spread over the ranks of a group."""

    full_shape: tuple[int, ...]
    """Shape of the whole parameter (what SOAP preconditions in lossless mode)."""
    split_shape: tuple[int, ...]
    """The view in which every rank's piece is a contiguous range along ``dim``."""
    dim: int
    """The dim of ``split_shape`` that is cut."""
    ranges: tuple[tuple[int, int], ...]
    """Per group rank, its ``[start, stop)`` along ``dim`` (empty when start == stop)."""
    replica: tuple[int, ...]
    """Per group rank, its replica group; ranks of one replica group hold the whole parameter
    between them, each piece once."""

    @cached_property
    def piece_numels(self) -> tuple[int, ...]:
        """Per group rank, the number of elements of its piece."""
        inner = math.prod(d for i, d in enumerate(self.split_shape) if i != self.dim)
        return tuple((stop - start) * inner for start, stop in self.ranges)

    def numel(self, rank: int) -> int:
        """Elements of ``rank``'s piece."""
        return self.piece_numels[rank]

    @cached_property
    def _sources_by_replica(self) -> dict[int, tuple[int, ...]]:
        groups: dict[int, list[int]] = {}
        for r, g in enumerate(self.replica):
            groups.setdefault(g, []).append(r)
        return {
            g: tuple(sorted(ranks, key=lambda r: (self.ranges[r][0], r)))
            for g, ranks in groups.items()
        }

    def sources(self, owner: int) -> tuple[int, ...]:
        """The ranks whose pieces make up the whole parameter for ``owner``.

        These are the ranks of the owner's replica group, in the order of their ranges.
        """
        return self._sources_by_replica[self.replica[owner]]

    @cached_property
    def pieces_concatenate(self) -> bool:
        """Whether the whole parameter, flattened, is its flat pieces one after another.

        True when the split is along the first dim that is not 1 (FSDP2's ``Shard(0)``, FSDP1's
        and DeepSpeed's flat ranges), so many parameters can be assembled by one concatenation,
        and each rank's piece is one range of the flattened parameter (:attr:`flat_ranges`).
        """
        return all(d == 1 for d in self.split_shape[: self.dim])

    @cached_property
    def flat_ranges(self) -> tuple[tuple[int, int], ...]:
        """Per group rank, ``[start, stop)`` of its piece in the flattened parameter.

        Meaningful only for layouts whose :attr:`pieces_concatenate` is True.
        """
        inner = math.prod(self.split_shape[self.dim + 1 :])
        return tuple((start * inner, stop * inner) for start, stop in self.ranges)

    def piece_key(self, rank: int) -> object:
        """Equal for two ranks exactly when they hold the same non-empty piece."""
        start, stop = self.ranges[rank]
        return (start, stop) if start != stop else ("empty", rank)

    def assemble(self, pieces: list[torch.Tensor], owner: int | None = None) -> torch.Tensor:
        """The whole parameter from flat pieces given in ``sources(owner)`` order."""
        shaped = []
        for piece in pieces:
            shape = list(self.split_shape)
            shape[self.dim] = -1 if piece.numel() else 0
            shaped.append(piece.reshape(shape))
        return torch.cat(shaped, dim=self.dim).reshape(self.full_shape)

    def extract(self, whole: torch.Tensor, rank: int) -> torch.Tensor:
        """``rank``'s piece of a whole-parameter tensor, flattened."""
        start, stop = self.ranges[rank]
        split = whole.reshape(self.split_shape)
        return split.narrow(self.dim, start, stop - start).reshape(-1)


Layout = ShardLayout | BoxLayout
"""Where the pieces of a sharded parameter live (the lossless strategies accept either)."""


def local_view(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of a parameter (a DTensor's local shard, else itself).

    A DTensor's shard is read from ``_local_tensor``, as FSDP2 itself does: ``to_local()``
    would go through an autograd function for every parameter of every step (~10 us each),
    and the optimizer works without autograd anyway.
    """
    local = getattr(param, "_local_tensor", None)
    if local is not None:
        return local
    return param.to_local() if hasattr(param, "to_local") else param


def chunk_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """The ``index``-th of ``parts`` ``torch.chunk`` pieces of ``size`` (possibly empty)."""
    step = -(-size // parts)
    return min(index * step, size), min((index + 1) * step, size)


def dtensor_layout(param: torch.Tensor, group: dist.ProcessGroup | None) -> Layout:
    """Layout of a DTensor parameter over ``group``; the mesh must hold exactly its ranks.

    One ``Shard`` placement (FSDP2; ``Replicate`` placements make replica groups, as HSDP's):
    a :class:`ShardLayout`. Anything else DTensor can place (several shards, strided shards:
    FSDP2 over tensor parallel): a :class:`~distsoap.box_layout.BoxLayout`.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh = param.device_mesh
    placements = param.placements
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    one_plain_shard = len(shard_dims) <= 1 and all(
        type(p) in (Shard, Replicate) for p in placements
    )
    world = dist.get_world_size(group)
    mesh_ranks = mesh.mesh.reshape(-1).tolist()
    group_ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)]
    if sorted(mesh_ranks) != sorted(group_ranks):
        raise ValueError(
            f"the parameters' device mesh holds ranks {sorted(mesh_ranks)} but SOAP's process "
            f"group holds {sorted(group_ranks)}; pass process_group= covering the mesh"
        )
    shape = tuple(param.shape)
    coords = {}
    for index, global_rank in enumerate(mesh.mesh.reshape(-1).tolist()):
        coords[global_rank] = list(torch.unravel_index(torch.tensor(index), mesh.mesh.shape))
    if not one_plain_shard:
        return box_layout(param, [[int(c) for c in coords[g]] for g in group_ranks], group_ranks)
    ranges, replica = [], []
    replica_ids: dict[tuple[int, ...], int] = {}
    for group_rank, global_rank in enumerate(group_ranks):
        coord = [int(c) for c in coords[global_rank]]
        if shard_dims:
            mesh_dim = shard_dims[0]
            dim = placements[mesh_dim].dim
            ranges.append(chunk_range(shape[dim], mesh.mesh.shape[mesh_dim], coord[mesh_dim]))
            key = tuple(c for i, c in enumerate(coord) if i != mesh_dim)
        else:  # replicated everywhere: every rank holds the whole parameter
            dim = 0
            ranges.append((0, shape[0] if shape else 1))
            key = (group_rank,)
        replica.append(replica_ids.setdefault(key, len(replica_ids)))
    split_shape = shape if shape else (1,)
    layout = ShardLayout(shape, split_shape, dim, tuple(ranges), tuple(replica))
    mine = group_ranks.index(dist.get_rank())
    if layout.numel(mine) != local_view(param).numel():
        raise ValueError(
            f"a DTensor parameter of shape {shape} holds {local_view(param).numel()} local "
            f"elements, not the {layout.numel(mine)} of an even torch.chunk split"
        )
    return layout


def box_layout(param: torch.Tensor, coords: list[list[int]], group_ranks: list[int]) -> BoxLayout:
    """The :class:`BoxLayout` of a DTensor parameter, checked against this rank's local shard."""
    shape = tuple(param.shape)
    mesh_shape = tuple(param.device_mesh.mesh.shape)
    boxes = tuple(held_box(shape, mesh_shape, c, param.placements) for c in coords)
    layout = BoxLayout(shape, boxes)
    mine = group_ranks.index(dist.get_rank())
    local_shape = tuple(len(ix) for ix in boxes[mine])
    if tuple(local_view(param).shape) != local_shape:
        raise ValueError(
            f"a DTensor parameter of shape {shape} with placements {param.placements} holds a "
            f"local shard of shape {tuple(local_view(param).shape)} here, where DTensor's layout "
            f"gives {local_shape}"
        )
    layout.check_tiles()
    return layout


def fsdp1_layouts(
    model: torch.nn.Module, params: list[torch.Tensor], group: dist.ProcessGroup | None
) -> dict[int, ShardLayout]:
    """Layouts of FSDP1 (``use_orig_params=True``) parameters, read from FSDP's flat params.

    Each rank knows only its own pieces (``FlatParameter._shard_param_infos``), so they are
    all-gathered once. Every original parameter becomes a flat element range per rank.

    Args:
        model: the FullyShardedDataParallel-wrapped model.
        params: the optimizer's parameters (original parameters, seen as 1-D local views).
        group: FSDP's process group.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    shapes: dict[int, tuple[int, ...]] = {}
    local: dict[int, tuple[int, int]] = {}
    for module in FSDP.fsdp_modules(model):
        handle = module._handle
        if handle is None:
            continue
        flat = handle.flat_param
        if not getattr(flat, "_params", None):
            raise ValueError("SOAP on FSDP1 needs use_orig_params=True")
        for param, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos):
            shapes[id(param)] = tuple(shape)
            if info.in_shard:
                local[id(param)] = (info.intra_param_start_idx, info.intra_param_end_idx + 1)
    index = {id(p): i for i, p in enumerate(params)}
    missing = [i for i, p in enumerate(params) if id(p) not in shapes and p.requires_grad]
    if missing:
        raise ValueError(f"parameters {missing} are not managed by the given FSDP model")
    mine = {index[k]: v for k, v in local.items() if k in index}
    full_shapes = [shapes.get(id(p)) for p in params]
    # the model's parameter names: a rank-independent identity of every position
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = [by_id.get(id(p)) for p in params]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (full_shapes, names, mine), group=group)
    if any(shapes_seen != gathered[0][0] for shapes_seen, _, _ in gathered):
        raise ValueError(
            "SOAP was built differently on different ranks: FSDP reports different full "
            "parameter shapes. Build the model and optimizer identically on every rank."
        )
    for position, name in enumerate(gathered[0][1]):
        seen = [names_seen[position] for _, names_seen, _ in gathered]
        if any(other != name for other in seen):
            raise ValueError(
                "SOAP was built differently on different ranks: the optimizer's parameter "
                f"{position} is {seen} on ranks 0..{len(seen) - 1}, so the ranks list the "
                "parameters in different orders. Build the param groups in one order on every "
                "rank, e.g. from model.named_parameters() (a set has no fixed order)."
            )
    gathered = [pieces for _, _, pieces in gathered]
    layouts = {}
    for i, p in enumerate(params):
        if id(p) not in shapes:
            continue
        shape = shapes[id(p)]
        numel = int(torch.Size(shape).numel())
        ranges = tuple(pieces.get(i, (0, 0)) for pieces in gathered)
        layouts[id(p)] = ShardLayout(shape, (numel,), 0, ranges, (0,) * len(ranges))
    return layouts


def held_stack_rows(param: torch.Tensor, stack_dims: int) -> tuple[int, ...] | None:
    """The matrices of a stack (``stack_dims``) that this rank's shard holds whole, if so.

    When every shard placement of a DTensor parameter cuts one of its stack dims (expert
    parallelism; FSDP2 sharding the expert dim), each rank's local tensor is a set of whole
    matrices, and SOAP on it is exactly SOAP on those matrices: no exchange is needed.

    Returns:
        The global index in the flattened stack of each matrix of the local tensor, in its
        order; None when the parameter is not such a DTensor (not stacked, not sharded, or
        cut along a matrix dim: the whole stack then goes to one owner).
    """
    from torch.distributed.tensor import Replicate

    placements = getattr(param, "placements", None)
    if not stack_dims or placements is None:
        return None
    shards = [p for p in placements if not isinstance(p, Replicate)]
    if not shards or any(getattr(p, "dim", stack_dims) >= stack_dims for p in shards):
        return None
    mesh = param.device_mesh
    shape = tuple(param.shape)
    box = held_box(shape, tuple(mesh.mesh.shape), mesh.get_coordinate(), placements)
    if tuple(len(ix) for ix in box) != tuple(local_view(param).shape):
        raise ValueError(
            f"a DTensor parameter of shape {shape} with placements {placements} holds a local "
            f"shard of shape {tuple(local_view(param).shape)} here, where DTensor's layout "
            f"gives {tuple(len(ix) for ix in box)}"
        )
    stack_shape = shape[:stack_dims]
    rows = itertools.product(*box[:stack_dims])
    return tuple(
        sum(i * math.prod(stack_shape[d + 1 :]) for d, i in enumerate(index)) for index in rows
    )
