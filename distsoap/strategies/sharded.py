"""Sharded parameters (FSDP2, HSDP, FSDP1): lossless SOAP on whole matrices, or local shards.

Lossless (``strategy="fsdp2"``, the default for DTensor parameters; ``"fsdp1"``): every
parameter has one owner rank (same placement as data parallel, over all ranks, so on an HSDP
mesh the owners are spread over the replicate dim too and no block is computed twice). Each step:

1. gradient pieces go to their owners: one uneven ``all_to_all_single`` for all parameters; the
   ranks of the owner's replica group send their pieces (empty pieces are zero-size splits, so
   uneven and empty shards never hang it);
2. the owner assembles the whole gradient and runs SOAP on the whole matrix;
3. update pieces go back: one more ``all_to_all_single``; every rank (every replica) receives
   the piece it holds and applies it to its local shard.

Each parameter's part of both payloads starts with one flag element (gradient present / update
computed), so parameters without gradients behave as in single-process SOAP.

Under ``fsdp2`` and ``fsdp1`` the blocks of a large blocked or stacked parameter may have
several owners (:func:`~distsoap.placement.place_blocks`, as under ``ddp``; the owners agree on
non-finite gradients and drift verdicts with
:func:`~distsoap.strategies.split_params.agree_on_split`). Where its blocks are boxes of its own
dims (every layout here: FSDP2's ``Shard(0)``, HSDP's replicas of it, FSDP1's and DeepSpeed's
flat pieces, FSDP2 over tensor parallel's boxes; not ``Shard(d)`` of a later dim), steps 1 and 3
go straight between the ranks and the owners of the blocks, each part once
(:mod:`~distsoap.strategies.split_exchange`, parts cut by
:mod:`~distsoap.strategies.direct_rows`). Elsewhere (merged dims, ``channels_last``, stacks
cut along a matrix dim) one owner, the *assembler*
(:func:`~distsoap.placement.choose_assemblers`: round trips spread over the ranks), takes the
steps above for the whole parameter; between them, one more ``all_to_all_single`` sends each
other owner the rows of the assembled gradient it holds, and one more brings their update rows
back, before the assembler scatters the whole update: a round trip of the rows, so splits
happen only where placing whole parameters would leave a rank over-loaded.

Local (``strategy="fsdp2_local"``): every rank runs SOAP on its own local shards as if they
were the parameters. No communication beyond FSDP's own; an approximation whose result depends
on the number of shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from distsoap.checkpointing.stack_rows import join_rows, split_rows
from distsoap.checks.replicas import check_copies
from distsoap.comm import pack_flagged, unpack_flagged, update_flag
from distsoap.engine.block_engine import BlockEngine
from distsoap.engine.blocks import layout_signature
from distsoap.placement import Piece, block_cost, choose_assemblers, place_blocks
from distsoap.sharding import Layout, held_stack_rows, local_view
from distsoap.strategies.base import Strategy, apply_updates, groups_by_param
from distsoap.strategies.direct_rows import direct_exchange_applies
from distsoap.strategies.frozen import check_still_frozen, frozen_params
from distsoap.strategies.split_exchange import SplitExchange
from distsoap.strategies.split_params import agree_on_skips, agree_on_split


@dataclass(frozen=True)
class ExchangePlan:
    """Who sends what to whom, in both directions, for one set of parameters.

    Lists are per peer rank and hold parameter indices in the same order on every rank.
    """

    mine: list[int]
    """The parameters of the set this rank owns."""
    grad_to: list[list[int]]
    """Per owner: the parameters whose gradient piece this rank sends it."""
    grad_from: list[list[int]]
    """Per source rank: the owned parameters whose piece it sends here."""
    update_from: list[list[int]]
    """Per owner: its parameters, whose update piece for this rank it sends."""
    grad_send_sizes: list[int]
    grad_recv_sizes: list[int]
    update_send_sizes: list[int]
    update_recv_sizes: list[int]
    grad_from_splits: list[list[int]]
    """Per source rank: ``[1, n, 1, n, ...]``, its payload cut into flags and pieces."""
    update_from_splits: list[list[int]]
    """Per owner: ``[1, n, 1, n, ...]``, its payload cut into flags and pieces."""

    @classmethod
    def build(
        cls,
        items: tuple[int, ...],
        owners: list[int],
        layouts: list[Layout],
        me: int,
        world: int,
    ) -> ExchangePlan:
        """The plan for parameters ``items`` seen from rank ``me``."""
        # gradients: to owner o, the pieces of o's parameters from o's replica group
        grad_to = [
            [i for i in items if owners[i] == o and me in layouts[i].sources(o)]
            for o in range(world)
        ]
        grad_from = [
            [i for i in items if owners[i] == me and s in layouts[i].sources(me)]
            for s in range(world)
        ]
        # updates: from owner o, to every rank, that rank's piece
        mine = [i for i in items if owners[i] == me]
        update_from = [[i for i in items if owners[i] == o] for o in range(world)]

        def size(rank: int, chosen: list[int]) -> int:
            return sum(1 + layouts[i].numel(rank) for i in chosen)

        def splits(rank: int, chosen: list[int]) -> list[int]:
            return [n for i in chosen for n in (1, layouts[i].numel(rank))]

        return cls(
            mine=mine,
            grad_to=grad_to,
            grad_from=grad_from,
            update_from=update_from,
            grad_send_sizes=[size(me, chosen) for chosen in grad_to],
            grad_recv_sizes=[size(s, chosen) for s, chosen in enumerate(grad_from)],
            update_send_sizes=[size(d, mine) for d in range(world)],
            update_recv_sizes=[size(me, chosen) for chosen in update_from],
            grad_from_splits=[splits(s, chosen) for s, chosen in enumerate(grad_from)],
            update_from_splits=[splits(me, chosen) for chosen in update_from],
        )


def local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """Return this rank's piece of the parameter's gradient, or None."""
    grad = param.grad
    return None if grad is None else local_view(grad)


def replica_slots(layouts: list[Layout], rank: int) -> tuple[list[int], int]:
    """Which copy of each parameter's piece ``rank`` holds, for :mod:`distsoap.checks.replicas`.

    Ranks holding the same non-empty range of a parameter (HSDP replicas, or every rank for a
    replicated DTensor) share a slot; every other rank gets one of its own.

    Returns:
        Per parameter, ``rank``'s slot; and the number of slots, 0 when no non-empty piece is
        held by two ranks (plain FSDP: nothing to compare).
    """
    slots, n_slots, shared = [], 1, False
    for layout in layouts:
        # an empty piece is nobody's copy: its own slot
        pieces = [layout.piece_key(r) for r in range(len(layout.piece_numels))]
        distinct = list(dict.fromkeys(pieces))
        shared = shared or len(distinct) < len(pieces)
        slots.append(distinct.index(pieces[rank]))
        n_slots = max(n_slots, len(distinct))
    return slots, n_slots if shared else 0


class ShardedLossless(SplitExchange, Strategy):
    """Whole-matrix SOAP on sharded parameters (see the module docstring).

    Args:
        engine: the optimizer's block engine.
        group: the process group spanning every rank that holds a piece.
        layouts: ``id(param)`` -> its layout, for every trainable parameter.
        name: the strategy name to report (``fsdp2`` or ``fsdp1``).
        comm_dtype: dtype of updates on the wire (None: exact).
        param_lists: (param group, its parameters) pairs, when the parameters SOAP steps are
            not those in the optimizer's param groups (DeepSpeed, which puts flat partitions
            there); default: the param groups.
    """

    direct_exchange: bool = True
    """Send the blocks of split parameters straight between shard holders and owners where
    :func:`~distsoap.strategies.direct_rows.direct_exchange_applies` (else every split
    parameter takes the assembler's round trip: what tests hold the direct exchange against)."""

    def __init__(
        self,
        engine: BlockEngine,
        group: dist.ProcessGroup | None,
        layouts: dict[int, Layout],
        name: str,
        comm_dtype: torch.dtype | None,
        param_lists: list[tuple[dict[str, Any], list[torch.Tensor]]] | None = None,
    ):
        super().__init__(engine, group)
        self.name = name
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.comm_dtype = comm_dtype
        self.params: list[torch.Tensor] = []
        self.layouts: list[Layout] = []
        self.costs = []
        self.specs = []
        self.held_rows: list[tuple[int, ...] | None] = []
        """Per parameter, the matrices of its expert stack this rank holds whole (stepped here,
        no exchange; :func:`~distsoap.sharding.held_stack_rows`), or None: it has an owner."""
        if param_lists is None:
            param_lists = [(g, list(g["params"])) for g in engine.param_groups]
        pairs = param_lists
        self.frozen = frozen_params([p for _, params in pairs for p in params])
        for group_, params in pairs:
            for p in params:
                if not p.requires_grad:
                    continue
                layout = layouts[id(p)]
                self.params.append(p)
                self.layouts.append(layout)
                spec = engine.whole_block_spec(p, group_, layout.full_shape)
                self.specs.append(spec)
                frequency = group_["precondition_frequency"]
                self.costs.append(block_cost(spec, frequency, *engine.state_element_bytes(p)))
                experts = held_stack_rows(p, group_.get("stack_dims", 0))
                blocks = math.prod(spec.grid)  # rows per matrix (block_size)
                self.held_rows.append(
                    None
                    if experts is None
                    else tuple(e * blocks + b for e in experts for b in range(blocks))
                )
        exchanged = [i for i, rows in enumerate(self.held_rows) if rows is None]
        self.owners = [-1] * len(self.params)
        """Per parameter, its owner rank (-1: stepped in place by every rank holding it, or a
        split parameter exchanged directly); of another split parameter, its assembler
        (:func:`~distsoap.placement.choose_assemblers`)."""
        self.split: dict[int, list[Piece]] = {}
        """Split parameters: index -> its pieces, by owner."""
        pieces = place_blocks(
            [self.costs[i] for i in exchanged],
            [self.specs[i].rows if self.specs[i].stacked else 1 for i in exchanged],
            [engine.split_blocks == "auto"] * len(exchanged),
            self.world,
        )
        for piece in pieces:
            i = exchanged[piece.param]
            if piece.rows is None:
                self.owners[i] = piece.owner
            else:
                self.split.setdefault(i, []).append(Piece(i, piece.owner, piece.rows))
        self.direct = {
            i
            for i in self.split
            if self.direct_exchange and direct_exchange_applies(self.specs[i], self.layouts[i])
        }
        """Split parameters whose blocks go straight between shard holders and piece owners
        (:mod:`~distsoap.strategies.direct_rows`); the others take the assembler's round trip."""
        self._init_split_exchange()
        routed = [p for p in pieces if exchanged[p.param] not in self.direct]
        row_numel = [math.prod(self.specs[i].block_shape) for i in exchanged]
        for j, assembler in choose_assemblers(routed, row_numel, self.world).items():
            self.owners[exchanged[j]] = assembler
        for i in self.direct:  # no assembler: in no exchange plan
            self.owners[i] = -1
        self._held = {
            id(self.params[i]): piece.rows
            for i, parts in self.split.items()
            for piece in parts
            if piece.owner == self.rank
        }
        self.in_place = tuple(i for i, rows in enumerate(self.held_rows) if rows is not None)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.exact = (
            torch.float64 if any(p.dtype == torch.float64 for p in self.params) else (torch.float32)
        )
        self.mine = [i for i in range(len(self.params)) if self.owners[i] == self.rank]
        self._plans: dict[tuple[int, ...], ExchangePlan] = {}
        self._slots, self._n_slots = replica_slots(self.layouts, self.rank)
        self._checked_replicas = self._n_slots == 0  # no piece is held twice: nothing to compare

    def _plan(self, items: tuple[int, ...]) -> ExchangePlan:
        """Who sends what to whom for the parameters ``items`` (cached; same on every rank)."""
        plan = self._plans.get(items)
        if plan is None:
            plan = ExchangePlan.build(items, self.owners, self.layouts, self.rank, self.world)
            self._plans[items] = plan
        return plan

    def owned_params(self) -> list[torch.Tensor]:
        """The parameters whose SOAP state lives on this rank."""
        return [p for p in self.params if self.owns(p)]

    def state_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """Lossless: the whole parameter's shape; an expert stack stepped in place: the shard's."""
        index = self._index[id(param)]
        if self.held_rows[index] is not None:
            return tuple(local_view(param).shape)
        return self.layouts[index].full_shape

    def owns(self, param: torch.Tensor) -> bool:
        """Whether this rank holds ``param``'s state (all, experts, or blocks of it)."""
        index = self._index.get(id(param))
        if index is None:
            return False
        if self.held_rows[index] is not None:
            return len(self.held_rows[index]) > 0 and local_view(param).numel() > 0
        if index in self.split:
            return id(param) in self._held
        return self.owners[index] == self.rank

    def state_rows(self, param: torch.Tensor) -> tuple[int, ...] | None:
        """The blocks of a split parameter this rank holds (None: all, or none)."""
        return self._held.get(id(param))

    def agree_skips(self, local: dict[int, bool]) -> set[int]:
        """The split parameters whose every piece is still diagonal (``BlockEngine``)."""
        split = [self.params[i] for i in self.split]
        pieces = [len(parts) for parts in self.split.values()]
        device = self.comm_device()
        return agree_on_skips(split, pieces, local, self.group, device, self.stats)

    def _stack_layouts(self, param: torch.Tensor) -> tuple[str, str]:
        """Layout signatures of a stack stepped in place: the whole stack's and this rank's."""
        group = groups_by_param(self.engine.param_groups)[id(param)]
        full = self.layouts[self._index[id(param)]].full_shape
        return (
            layout_signature(self.engine.block_spec(param, group, full)),
            layout_signature(self.engine.block_spec(param, group, self.state_shape(param))),
        )

    def export_state(
        self, param: torch.Tensor, entry: dict[str, Any], group: dict[str, Any]
    ) -> dict[str, Any]:
        """Experts stepped in place are keyed by their index in the whole stack."""
        rows = self.held_rows[self._index[id(param)]]
        if rows is None:
            return super().export_state(param, entry, group)
        return split_rows(entry, rows, self._stack_layouts(param)[0])

    def import_state(self, param: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        """The state of the experts or blocks held here, from per-row or whole entries."""
        index = self._index[id(param)]
        if id(param) in self._held:
            rows = self._held[id(param)]
            spec = self.specs[index]
            layouts = (layout_signature(spec), layout_signature(spec.holding(rows)))
            return join_rows(saved, rows, layouts)
        rows = self.held_rows[index]
        if rows is None:
            return super().import_state(param, saved)
        return join_rows(saved, rows, self._stack_layouts(param))

    def param_groups_changed(self) -> None:
        """Layouts come with the model; adding groups later is not supported."""
        raise RuntimeError(
            f"add_param_group is not supported with strategy={self.name!r}: "
            "create the optimizer with every param group"
        )

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Torch's clip_grad_norm_, which handles DTensor gradients."""
        params = [p for p in self.params if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _device(self) -> torch.device:
        return local_view(self.params[0]).device if self.params else torch.device("cpu")

    def _exchange(self, send, send_sizes, recv_sizes, kind: str, overlap=None) -> list:
        """One uneven all-to-all; ``overlap()`` runs while it is in flight."""
        received = send.new_empty(sum(recv_sizes))
        work = dist.all_to_all_single(
            received, send, recv_sizes, send_sizes, group=self.group, async_op=True
        )
        sent = sum(n for r, n in enumerate(send_sizes) if r != self.rank)
        self.stats.add(kind, sent * send.element_size())
        if overlap is not None:
            overlap()
        work.wait()
        return list(received.split(recv_sizes))

    def _local_grad(self, index: int) -> torch.Tensor | None:
        """Return this rank's piece of parameter ``index``'s gradient, or None."""
        return local_grad(self.params[index])

    def _local_target(self, index: int) -> torch.Tensor:
        """The tensor this rank updates for parameter ``index`` (its local piece)."""
        return local_view(self.params[index])

    def _grad_dtype(self, index: int) -> torch.dtype:
        """Dtype SOAP receives parameter ``index``'s assembled gradient in."""
        return self.params[index].dtype

    @torch.no_grad()
    def step(self) -> None:
        """Gather gradients to owners, step the owned blocks, scatter the updates back.

        First (same error on every rank, before any exchange): no parameter frozen at
        construction may have become trainable, and, until a step with real gradients has been
        checked, ranks holding the same piece (HSDP replicas) must hold equal values and
        gradients (:mod:`distsoap.checks.replicas`).
        """
        check_still_frozen(self.engine, self.frozen, self.name)
        if not self._checked_replicas:
            self._checked_replicas = check_copies(
                self.name,
                [self.engine.param_name(p) for p in self.params],
                [local_view(p) for p in self.params],
                [local_grad(p) for p in self.params],
                self._slots,
                self._n_slots,
                self.group,
                self.comm_device(),
                compare_grads=True,
            )
        self.step_items(tuple(range(len(self.params))))

    def step_items(self, items: tuple[int, ...]) -> None:
        """One step of the parameters ``items`` (every rank passes the same ones)."""
        in_place = [i for i in items if self.held_rows[i] is not None]
        if in_place:
            items = tuple(i for i in items if self.held_rows[i] is None)
        plan = self._plan(items)
        device = self._device()
        # 1. gradient pieces to owners
        blocks = []
        for to_owner in plan.grad_to:
            for i in to_owner:
                piece = self._local_grad(i)
                blocks.append((float(piece is not None), piece, self.layouts[i].numel(self.rank)))
        send = pack_flagged(blocks, self.exact, device)
        received = self._exchange(send, plan.grad_send_sizes, plan.grad_recv_sizes, "grad_sync")
        # 2. whole gradients of owned blocks, SOAP on them
        pieces: dict[int, dict[int, torch.Tensor]] = {i: {} for i in plan.mine}
        present: dict[int, bool] = {i: False for i in plan.mine}
        flags_from, pieces_from = unpack_flagged(received, plan.grad_from_splits)
        for source, from_source in enumerate(plan.grad_from):
            for i, flag, piece in zip(from_source, flags_from[source], pieces_from[source]):
                present[i] = present[i] or flag != 0
                pieces[i][source] = piece
        grads = self._assemble([i for i in plan.mine if present[i]], pieces)
        for i in in_place:  # whole experts held here: SOAP on the local shard is exact
            piece = self._local_grad(i)
            if piece is not None and piece.numel() > 0:
                grads[id(self.params[i])] = piece
        split = [i for i in items if i in self.split]
        direct = [i for i in split if i in self.direct]
        routed = [i for i in split if i not in self.direct]
        nonfinite: set[int] = set()
        if direct:
            self._direct_grads(direct, grads, device)
        if routed:
            self._send_rows(routed, grads, device)
        if split:
            params = [self.params[i] for i in split]
            comm = self.comm_device()
            nonfinite = agree_on_split(self.engine, params, grads, self.group, comm, self.stats)
        updates = self.engine.compute_updates(grads, defer_refresh=True, nonfinite=nonfinite)
        error = self.engine.faults.take_pending()
        pieces_abort = self._gather_rows(routed, updates, error, device) if routed else False
        direct_updates = self._direct_updates(direct, updates, error, device) if direct else []
        # 3. update pieces back to every rank
        out_dtype = self.comm_dtype or self.exact
        deltas = [updates.get(id(self.params[i]), (None, None))[1] for i in plan.mine]
        flat = [
            None if d is None or not self.layouts[i].pieces_concatenate else d.reshape(-1)
            for i, d in zip(plan.mine, deltas)
        ]
        blocks = []
        for destination in range(self.world):
            for i, delta, whole in zip(plan.mine, deltas, flat):
                layout = self.layouts[i]
                if whole is not None:  # one view instead of a reshape, narrow and reshape
                    start, stop = layout.flat_ranges[destination]
                    piece = whole[start:stop]
                else:
                    piece = None if delta is None else layout.extract(delta, destination)
                flag = update_flag(delta is not None, error is not None or pieces_abort)
                blocks.append((flag, piece, layout.numel(destination)))
        send = pack_flagged(blocks, out_dtype, device)
        received = self._exchange(  # the refreshes only prepare the next step: overlap them
            send,
            plan.update_send_sizes,
            plan.update_recv_sizes,
            "update_scatter",
            overlap=self.engine.finish_refreshes,
        )
        flags_from, pieces_from = unpack_flagged(received, plan.update_from_splits)
        received_blocks = (
            (i, owner, flag, piece)
            for owner, from_owner in enumerate(plan.update_from)
            for i, flag, piece in zip(from_owner, flags_from[owner], pieces_from[owner])
        )
        groups = groups_by_param(self.engine.param_groups)
        aborting = self.apply_flagged(received_blocks, self.params, self._local_target, groups)
        aborting |= self.apply_flagged(direct_updates, self.params, self._local_target, groups)
        if in_place:
            targets = {id(self.params[i]): self._local_target(i) for i in in_place}
            local = {k: updates[k] for k in targets if k in updates}
            apply_updates(self.engine.param_groups, local, targets)
            aborting |= self._stop_flags(error)
        self.finish(error, aborting)

    def _stop_flags(self, error: str | None) -> set[int]:
        """The ranks that must stop (one flag each, all-reduced).

        A fault in an expert stack stepped in place is known only where it happened, and no
        update of it travels to carry the news.
        """
        stop = torch.zeros(self.world, device=self.comm_device())
        stop[self.rank].fill_(float(error is not None))  # a scalar fill, no host-to-device copy
        dist.all_reduce(stop, group=self.group)
        self.stats.add("fault_check", stop.element_size() * 2 * (self.world - 1))  # ring volume
        return {r for r, s in enumerate(stop.tolist()) if s > 0}

    def _assemble(
        self, items: list[int], pieces: dict[int, dict[int, torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """Whole gradients of ``items`` from their pieces (``pieces[i][source]``, flat).

        Parameters whose pieces simply concatenate (:attr:`Layout.pieces_concatenate`)
        are assembled together, one concatenation per gradient dtype, and handed out as views;
        the others (split along an inner dim) one by one.
        """
        grads: dict[int, torch.Tensor] = {}
        together: dict[torch.dtype, list[int]] = {}
        for i in items:
            layout = self.layouts[i]
            if layout.pieces_concatenate:
                together.setdefault(self._grad_dtype(i), []).append(i)
                continue
            ordered = [pieces[i][s] for s in layout.sources(self.rank)]
            whole = layout.assemble(ordered, self.rank)
            grads[id(self.params[i])] = whole.to(self._grad_dtype(i))
        for dtype, same in together.items():
            flat = [pieces[i][s] for i in same for s in self.layouts[i].sources(self.rank)]
            whole = torch.cat(flat).to(dtype)
            offset = 0
            for i in same:
                shape = self.layouts[i].full_shape
                numel = math.prod(shape)
                grads[id(self.params[i])] = whole[offset : offset + numel].view(shape)
                offset += numel
        return grads


class LocalShards(Strategy):
    """SOAP on each rank's local shards as independent blocks (approximate).

    Nothing is communicated but one stop flag per step, over ``group``, so a fault on one rank
    stops every rank of the group at the same step.
    """

    name = "fsdp2_local"

    def __init__(self, engine: BlockEngine, group: dist.ProcessGroup | None = None):
        super().__init__(engine, group)
        self.distributed = dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world = dist.get_world_size(group) if self.distributed else 1

    def state_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """Local mode: this rank's shard's shape."""
        return tuple(local_view(param).shape)

    def owns(self, param: torch.Tensor) -> bool:
        """Every rank holds the state of its own non-empty shards."""
        return local_view(param).numel() > 0

    def state_key_suffix(self) -> str:
        """Shard state differs per rank: tag keys with it so checkpoints keep every copy.

        The global rank, which names this rank's shards uniquely whatever the group.
        """
        return f"@rank{dist.get_rank()}" if dist.is_initialized() else ""

    @torch.no_grad()
    def step(self) -> None:
        """Step every non-empty local shard that has a gradient."""
        grads, targets = {}, {}
        for group in self.engine.param_groups:
            for p in group["params"]:
                piece = local_grad(p)
                if piece is not None and piece.numel() > 0:
                    grads[id(p)] = piece
                    targets[id(p)] = local_view(p)
        updates = self.engine.compute_updates(grads)
        apply_updates(self.engine.param_groups, updates, targets)
        error = self.engine.faults.take_pending()
        aborting: set[int] = set()
        if self.distributed:  # one rank stopping alone would hang FSDP's next collective
            stop = torch.zeros(self.world, device=self._device())
            stop[self.rank].fill_(float(error is not None))  # a scalar fill, no host-to-device copy
            dist.all_reduce(stop, group=self.group)
            volume = stop.element_size() * 2 * (self.world - 1)  # ring volume
            self.stats.add("fault_check", volume)
            aborting = {r for r, s in enumerate(stop.tolist()) if s > 0}
        self.finish(error, aborting)

    def _device(self) -> torch.device:
        for group in self.engine.param_groups:
            for p in group["params"]:
                return local_view(p).device
        return torch.device("cpu")
