"""The plan: which rank holds which SOAP state, in bytes and refresh FLOPs, next to AdamW's.

Parameters are taken as SOAP's param groups would hold them: the trainable parameters whose
names do not match ``stack_pattern`` in one group, then (with ``stack_dims`` > 0) the matching
ones in a ``stack_dims`` group, the order the README's "MoE experts" example uses. Frozen
parameters (``requires_grad=False``) have no state. Every parameter is assumed to get a
gradient, so every block is allocated.

Per strategy, as :mod:`distsoap.strategies` places the blocks:

- ``single``: every rank holds every block.
- ``ddp``, ``zero2``: each block has one owner, from :func:`~distsoap.placement.place_blocks`
  over :func:`~distsoap.placement.block_cost`, with the same costs, in the same order, as the
  strategy computes them: the per-rank numbers are exact. The blocks of a stacked or blocked
  parameter may go to several ranks (a *split* parameter).
- ``fsdp2``: FSDP2's default layout, dim 0 of every parameter sharded in ``torch.chunk`` pieces
  over a 1-D mesh of ``world`` ranks. Parameters and blocks are placed on owners as under
  ``ddp``, except expert stacks (``stack_dims`` > 0), whose dim-0 shards are whole experts:
  each rank steps those it holds in place (:func:`~distsoap.sharding.held_stack_rows`).
- ``fsdp2_local``: every rank keeps the state of its own dim-0 shard of every parameter, blocked
  as if the shard were the parameter.

AdamW (``torch.optim.AdamW`` for the same strategy) keeps two moments per element, fp32 (fp64
for fp64 parameters): replicated on every rank under ``single`` and ``ddp``; under ``zero2`` each
dtype's flat buffer split evenly over the ranks (ZeRO's partition); under ``fsdp2`` and
``fsdp2_local`` the state of each rank's dim-0 shards.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from distsoap.engine.blocks import BlockSpec, make_block_spec
from distsoap.placement import Piece, block_cost, choose_assemblers, place_blocks
from distsoap.plan.costs import NO_STATE, BlockState, block_state
from distsoap.plan.options import PlanError, PlanOptions
from distsoap.sharding import chunk_range
from distsoap.strategies.direct_rows import blocks_are_boxes

EVERY_RANK = -1
"""``ParamPlan.owner`` of a parameter held by every rank (``single``)."""
SHARDED = -2
"""``ParamPlan.owner`` of a parameter whose state is kept per shard, where the shard lives."""
SPLIT = -3
"""``ParamPlan.owner`` of a parameter whose blocks have several owners (``ddp``, ``zero2``)."""


@dataclass(frozen=True)
class ParamPlan:
    """One parameter as the planner sees it."""

    name: str
    """Its name in ``model.named_parameters()``."""
    shape: tuple[int, ...]
    """Its full shape."""
    dtype: torch.dtype
    """Its dtype (``PlanOptions.param_dtype`` when given)."""
    stack_dims: int
    """The ``stack_dims`` of its param group."""
    spec: BlockSpec
    """Its block layout as a whole parameter (shards under ``fsdp2_local`` have their own)."""
    owner: int
    """The rank holding its state, or :data:`EVERY_RANK` / :data:`SHARDED` / :data:`SPLIT`."""
    state: BlockState
    """Its state and refresh cost summed over the ranks holding it."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass
class RankPlan:
    """What one rank holds."""

    moments: int = 0
    """Bytes of SOAP's ``exp_avg`` and ``exp_avg_sq``."""
    factors: int = 0
    """Bytes of SOAP's Kronecker factors."""
    bases: int = 0
    """Bytes of SOAP's eigenbases."""
    refresh_flops: float = 0.0
    """Modelled FLOPs per step of the eigenbasis refreshes (see :mod:`distsoap.plan.costs`)."""
    refresh_flops_fewest: float = 0.0
    """The same with every skip the adaptive refresh may take taken (``refresh_flops``
    without the adaptive refresh)."""
    blocks: int = 0
    """Number of blocks (parameters or shards) whose state is here."""
    split_exchange: int = 0
    """Bytes this rank sends per step for the round trip of split parameters' rows
    (``fsdp2``: see :func:`split_exchange_bytes`; 0 elsewhere)."""
    adamw: int = 0
    """Bytes of AdamW's state for the same strategy."""

    @property
    def soap(self) -> int:
        """Bytes of all SOAP state."""
        return self.moments + self.factors + self.bases

    def add(self, state: BlockState) -> None:
        """Hold one more block."""
        if state.total == 0:
            return
        self.moments += state.moments
        self.factors += state.factors
        self.bases += state.bases
        self.refresh_flops += state.refresh_flops
        self.refresh_flops_fewest += state.refresh_flops_fewest
        self.blocks += 1


@dataclass
class Plan:
    """The plan of one model under one set of options."""

    options: PlanOptions
    """What was planned."""
    params: list[ParamPlan] = field(default_factory=list)
    """The trainable parameters, in param-group order."""
    ranks: list[RankPlan] = field(default_factory=list)
    """One entry per rank."""

    @property
    def numel(self) -> int:
        """Trainable elements of the model."""
        return sum(p.numel for p in self.params)


def param_groups(
    model: nn.Module, options: PlanOptions
) -> list[tuple[int, list[tuple[str, nn.Parameter]]]]:
    """The trainable parameters as SOAP's param groups: ``(stack_dims, named parameters)``.

    One group, or two with ``stack_dims`` > 0: the parameters not matching ``stack_pattern``,
    then those matching it (empty groups left out). Build the optimizer the plan is checked
    against from these, in this order: placement depends on the order.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not options.stack_dims:
        return [(0, named)]
    pattern = re.compile(options.stack_pattern)
    stacked = [(n, p) for n, p in named if pattern.search(n)]
    rest = [(n, p) for n, p in named if not pattern.search(n)]
    groups = [(0, rest), (options.stack_dims, stacked)]
    return [(dims, params) for dims, params in groups if params]


def _chunk(size: int, parts: int, index: int) -> int:
    """Length of the ``index``-th of ``parts`` ``torch.chunk`` pieces of ``size``."""
    start, stop = chunk_range(size, parts, index)
    return stop - start


def shard_shape(shape: tuple[int, ...], world: int, rank: int) -> tuple[int, ...]:
    """The shape of ``rank``'s ``torch.chunk`` piece of dim 0 (FSDP2's default sharding)."""
    if not shape:
        return shape
    return (_chunk(shape[0], world, rank), *shape[1:])


class _Specs:
    """Block specs by shape, computed once per shape (many shards share one)."""

    def __init__(self, options: PlanOptions):
        self.options = options
        self._cache: dict[tuple, BlockSpec] = {}

    def __call__(self, name: str, shape: tuple[int, ...], stack_dims: int) -> BlockSpec:
        key = (shape, stack_dims)
        if key not in self._cache:
            o = self.options
            try:
                self._cache[key] = make_block_spec(
                    shape,
                    max_precond_dim=o.max_precond_dim,
                    merge_dims=o.merge_dims,
                    precondition_1d=o.precondition_1d,
                    data_format=o.data_format,
                    stack_dims=stack_dims,
                    one_sided=o.one_sided,
                    block_size=o.block_size,
                )
            except ValueError as error:
                raise PlanError(f"parameter {name!r}: {error}") from None
        return self._cache[key]


def _adamw_bytes(params: list[ParamPlan], options: PlanOptions) -> list[int]:
    """AdamW's state bytes per rank for the strategy (see the module docstring)."""
    world = options.world

    def per_element(p: ParamPlan) -> int:
        return 2 * (8 if p.dtype == torch.float64 else 4)

    if options.strategy in ("single", "ddp"):
        return [sum(p.numel * per_element(p) for p in params)] * world
    if options.strategy == "zero2":
        flat: dict[int, int] = {}
        for p in params:
            flat[per_element(p)] = flat.get(per_element(p), 0) + p.numel
        return [
            sum(size * _chunk(total, world, rank) for size, total in flat.items())
            for rank in range(world)
        ]
    return [
        sum(math.prod(shard_shape(p.shape, world, rank)) * per_element(p) for p in params)
        for rank in range(world)
    ]


class _Entry(NamedTuple):
    """A trainable parameter on its way through :func:`plan`."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stack_dims: int
    spec: BlockSpec


def _owners(entries: list[_Entry], options: PlanOptions) -> tuple[list[int], list[Piece]]:
    """Each parameter's owner rank, as the strategy places it, or EVERY_RANK / SHARDED / SPLIT.

    Returns:
        The owners, and the pieces of the split parameters.
    """
    if options.strategy == "single":
        return [EVERY_RANK] * len(entries), []
    owners = [SHARDED] * len(entries)
    if options.strategy == "fsdp2_local":
        return owners, []
    in_place = options.strategy == "fsdp2"  # expert stacks stepped where their shards live
    placed = [i for i, e in enumerate(entries) if not (in_place and e.stack_dims > 0)]
    costs = [
        block_cost(
            entries[i].spec,
            options.precondition_frequency,
            *options.element_bytes(entries[i].dtype),
        )
        for i in placed
    ]
    rows = [entries[i].spec.rows if entries[i].spec.stacked else 1 for i in placed]
    splittable = [options.split_blocks == "auto"] * len(placed)
    pieces = place_blocks(costs, rows, splittable, options.world)
    split = []
    for piece in pieces:
        i = placed[piece.param]
        if piece.rows is None:
            owners[i] = piece.owner
        else:
            owners[i] = SPLIT
            split.append(Piece(i, piece.owner, piece.rows))
    return owners, split


def split_exchange_bytes(entries: list[_Entry], split: list[Piece], world: int) -> list[int]:
    """Per rank, the bytes it sends per step for the round trip of split parameters (``fsdp2``).

    A split parameter whose blocks are boxes of its own dims goes straight between the ranks
    holding its dim-0 shards and its owners (:mod:`~distsoap.strategies.direct_rows`): no
    round trip. Of any other, one owner, its *assembler*
    (:func:`~distsoap.placement.choose_assemblers`), assembles the whole gradient as for a
    parameter placed whole, sends every other owner its piece's rows and receives their
    update rows back (:class:`~distsoap.strategies.sharded.ShardedLossless`); each direction
    carries one flag element per piece and the piece's rows, the zero padding of blocks
    included, in fp32 (fp64 when some parameter is fp64), as with the default ``comm_dtype``
    (bf16 would halve the update rows). Under ``ddp`` and ``zero2`` a split parameter's pieces
    travel where the whole one would: no round trip.
    """
    element = 8 if any(e.dtype == torch.float64 for e in entries) else 4
    row_numel = [math.prod(e.spec.block_shape) for e in entries]
    # FSDP2's Shard(0): boxes of the parameter's own dims go straight to their owners
    split = [piece for piece in split if not blocks_are_boxes(entries[piece.param].spec)]
    assemblers = choose_assemblers(split, row_numel, world)
    sent = [0] * world
    for piece in split:
        assembler = assemblers[piece.param]
        if piece.owner != assembler:
            elements = 1 + len(piece.rows) * row_numel[piece.param]
            sent[assembler] += elements * element  # gradient rows out
            sent[piece.owner] += elements * element  # update rows back
    return sent


def plan(model: nn.Module, options: PlanOptions) -> Plan:
    """Plan SOAP's state for ``model`` (any device: meta is enough) under ``options``.

    Args:
        model: the model; only parameter names, shapes, dtypes and ``requires_grad`` are read.
        options: the strategy, the number of ranks and SOAP's options.

    Returns:
        The plan: per parameter its layout and owner, per rank its state.

    Raises:
        PlanError: a parameter the options cannot lay out (``stack_dims`` too large for it).
    """
    world, frequency = options.world, options.precondition_frequency
    skips = options.skip_bound
    specs = _Specs(options)
    entries = [
        _Entry(name, tuple(p.shape), options.param_dtype or p.dtype, stack_dims, spec)
        for stack_dims, named in param_groups(model, options)
        for name, p in named
        for spec in [specs(name, tuple(p.shape), stack_dims)]
    ]
    ranks = [RankPlan() for _ in range(world)]
    params: list[ParamPlan] = []
    owners, split = _owners(entries, options)
    for index, (entry, owner) in enumerate(zip(entries, owners)):
        element_bytes = options.element_bytes(entry.dtype)
        if owner == SPLIT:
            total = NO_STATE
            for piece in (piece for piece in split if piece.param == index):
                held = entry.spec.holding(piece.rows)
                state = block_state(held, element_bytes, frequency, skips)
                ranks[piece.owner].add(state)
                total = total + state
        elif owner == EVERY_RANK:
            state = block_state(entry.spec, element_bytes, frequency, skips)
            for rank in ranks:
                rank.add(state)
            total = state.times(world)
        elif owner >= 0:
            total = block_state(entry.spec, element_bytes, frequency, skips)
            ranks[owner].add(total)
        else:  # each rank its dim-0 shard (at most three distinct shard shapes)
            total = NO_STATE
            pieces: dict[tuple[int, ...], BlockState] = {}
            for r, rank in enumerate(ranks):
                local = shard_shape(entry.shape, world, r)
                if local not in pieces:
                    local_spec = specs(entry.name, local, entry.stack_dims)
                    pieces[local] = block_state(local_spec, element_bytes, frequency, skips)
                rank.add(pieces[local])
                total = total + pieces[local]
        params.append(
            ParamPlan(
                entry.name, entry.shape, entry.dtype, entry.stack_dims, entry.spec, owner, total
            )
        )
    for rank, adamw in zip(ranks, _adamw_bytes(params, options)):
        rank.adamw = adamw
    if options.strategy == "fsdp2":
        for rank, sent in zip(ranks, split_exchange_bytes(entries, split, world)):
            rank.split_exchange = sent
    return Plan(options, params, ranks)
