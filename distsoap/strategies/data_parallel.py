"""Replicated parameters, sharded SOAP: each block's state and work on exactly one owner rank.

Mode A (``strategy="ddp"``): the model is wrapped in DistributedDataParallel, so ``.grad`` is
already averaged and equal on every rank. Owners compute their blocks' updates; the updates are
all-gathered bucket by bucket (each bucket launched asynchronously as soon as this rank's part is
computed) and every rank applies the same values.

Mode B (``strategy="zero2"``): no wrapper. :class:`~distsoap.strategies.grad_sync.GradSync`
sends each owner the gradients of its blocks during backward; the rest is as in mode A.

The blocks of a stacked or blocked parameter (``stack_dims``, ``block_size``) are placed one by
one (:func:`~distsoap.placement.place_blocks`), so one parameter may be *split*: each of its
owners holds the state of some of its rows and receives, and sends back, those rows alone (in
row form, ``(rows, *block_shape)``, the padding of blocks included). Every rank puts the pieces
of a split parameter back together before applying its update. What single-process SOAP
decides per parameter stays per parameter: a non-finite gradient in any piece skips every piece,
and a drift-guard verdict in any piece moves every piece to fp32 bases (one all-reduce of two
flags per split parameter and step, before the update, only when some parameter is split); the
adaptive refresh skips a split parameter only when every piece is still diagonal (one more
all-reduce, in ``finish_refreshes``: :attr:`BlockEngine.agree_skips`).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist

from distsoap.checkpointing.stack_rows import join_rows
from distsoap.checks.replicas import check_copies
from distsoap.comm import (
    PendingExchange,
    build_buckets,
    launch_gather,
    pack_flagged,
    read_flag,
    unpack_flagged,
    update_flag,
)
from distsoap.engine.block_engine import BlockEngine
from distsoap.engine.blocks import BlockSpec, layout_signature
from distsoap.engine.update import apply_deltas
from distsoap.placement import Piece, block_cost, place_blocks
from distsoap.strategies.base import Strategy, groups_by_param
from distsoap.strategies.frozen import check_still_frozen, frozen_params
from distsoap.strategies.grad_sync import GradSync
from distsoap.strategies.split_params import (
    agree_on_skips,
    agree_on_split,
    has_update,
    join_pieces,
)


class DataParallel(Strategy):
    """Owner-sharded SOAP over replicated parameters (see the module docstring).

    Args:
        engine: the optimizer's block engine.
        group: the process group (None: the world).
        sync_gradients: mode B; distsoap averages the gradients itself.
        comm_dtype: dtype of the updates on the wire (None: as computed, exact; bf16 / fp16:
            approximate).
        bucket_cap_mb: size of a communication bucket in MiB of gradients.

    """

    def __init__(
        self,
        engine: BlockEngine,
        group: dist.ProcessGroup | None,
        *,
        sync_gradients: bool,
        comm_dtype: torch.dtype | None,
        bucket_cap_mb: float,
    ):
        super().__init__(engine, group)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.sync_gradients = sync_gradients
        self.name = "zero2" if sync_gradients else "ddp"
        self.comm_dtype = comm_dtype
        self.bucket_cap_mb = bucket_cap_mb
        self.grad_sync: GradSync | None = None
        self._checked_replicas = False
        self._place()

    def _place(self) -> None:
        """Owners, pieces and buckets from the trainable parameters; identical on every rank."""
        engine = self.engine
        self.params: list[torch.Tensor] = []
        self.frozen = frozen_params([p for g in engine.param_groups for p in g["params"]])
        self._held: dict[int, tuple[int, ...]] = {}  # empty: block_spec gives whole specs
        self.specs: list[BlockSpec] = []
        costs, rows, splittable = [], [], []
        for group in engine.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                self.params.append(p)
                spec = engine.whole_block_spec(p, group)
                self.specs.append(spec)
                frequency = group["precondition_frequency"]
                costs.append(block_cost(spec, frequency, *engine.state_element_bytes(p)))
                rows.append(spec.rows if spec.stacked else 1)
                splittable.append(engine.split_blocks == "auto")
        self.costs = costs
        self.pieces: list[Piece] = place_blocks(costs, rows, splittable, self.world)
        self.owners = [-1] * len(self.params)
        """Per parameter, its owner rank, or -1 when its blocks have several owners."""
        self.split: dict[int, list[int]] = {}
        """Split parameters: index -> the indices of its pieces, by owner."""
        for k, piece in enumerate(self.pieces):
            if piece.rows is None:
                self.owners[piece.param] = piece.owner
            else:
                self.split.setdefault(piece.param, []).append(k)
        mine = [piece for piece in self.pieces if piece.owner == self.rank]
        self._mine = {id(self.params[piece.param]): piece for piece in mine}
        self._held = {id(self.params[pc.param]): pc.rows for pc in mine if pc.rows is not None}
        self.buckets = build_buckets(
            [self._piece_numel(piece) for piece in self.pieces],
            [self.params[piece.param].dtype for piece in self.pieces],
            [piece.owner for piece in self.pieces],
            self.world,
            max(1, int(self.bucket_cap_mb * 2**20 / self._element_size())),
        )
        if self.sync_gradients:
            self.close()
            self.grad_sync = GradSync(
                self.params,
                [piece.param for piece in self.pieces],
                self._piece_grad,
                [self._piece_shape(piece) for piece in self.pieces],
                self.buckets,
                self.rank,
                self.group,
                self.stats,
                check_before_exchange=self._check_replicas,
            )

    def _element_size(self) -> int:
        return max(p.element_size() for p in self.params) if self.params else 4

    def agree_skips(self, local: dict[int, bool]) -> set[int]:
        """The split parameters whose every piece is still diagonal (``BlockEngine``)."""
        split = [self.params[i] for i in self.split]
        pieces = [len(keys) for keys in self.split.values()]
        device = self.comm_device()
        return agree_on_skips(split, pieces, local, self.group, device, self.stats)

    def _piece_shape(self, piece: Piece) -> tuple[int, ...]:
        """Shape of a piece's gradient and update: the parameter's, or its rows'."""
        if piece.rows is None:
            return tuple(self.params[piece.param].shape)
        return (len(piece.rows), *self.specs[piece.param].block_shape)

    def _piece_numel(self, piece: Piece) -> int:
        """Elements of a piece's gradient and update on the wire."""
        return math.prod(self._piece_shape(piece))

    def _piece_grad(self, index: int) -> torch.Tensor | None:
        """The local gradient of piece ``index`` on this rank: the parameter's, or its rows."""
        piece = self.pieces[index]
        grad = self.params[piece.param].grad
        if grad is None or piece.rows is None:
            return grad
        rows = torch.tensor(piece.rows, device=grad.device)
        return self.specs[piece.param].to_rows(grad).index_select(0, rows)

    def state_rows(self, param: torch.Tensor) -> tuple[int, ...] | None:
        """The blocks of a split parameter this rank holds (None: all, or none)."""
        return self._held.get(id(param))

    def import_state(self, param: torch.Tensor, saved: dict) -> dict:
        """The blocks of a split parameter held here, from per-block or whole entries."""
        rows = self._held.get(id(param))
        if rows is None:
            return super().import_state(param, saved)
        whole = self._whole_spec(param)
        layouts = (layout_signature(whole), layout_signature(whole.holding(rows)))
        return join_rows(saved, rows, layouts)

    def _whole_spec(self, param: torch.Tensor) -> BlockSpec:
        return self.specs[next(i for i, p in enumerate(self.params) if p is param)]

    def owned_params(self) -> list[torch.Tensor]:
        """The parameters whose SOAP state (all of it, or some blocks) lives on this rank."""
        return [p for p in self.params if id(p) in self._mine]

    def param_groups_changed(self) -> None:
        """Redo the placement, which depends on every parameter (only before the first step)."""
        if self.stats.steps:
            raise RuntimeError(
                "add_param_group after the first step is not supported with "
                f"strategy={self.name!r}: create the optimizer with every group"
            )
        self._place()

    def close(self) -> None:
        """Mode B: remove the gradient hooks (they would keep synchronising)."""
        if self.grad_sync is not None:
            self.grad_sync.remove()
            self.grad_sync = None

    def owns(self, param: torch.Tensor) -> bool:
        """Whether this rank holds ``param``'s state (all of it, or some of its blocks)."""
        return id(param) in self._mine

    def no_sync(self) -> AbstractContextManager:
        """Mode B: skip synchronisation inside the context. Mode A: nothing (use DDP's)."""
        return self.grad_sync.no_sync() if self.sync_gradients else nullcontext()

    def _owned_grads(self) -> dict[int, torch.Tensor]:
        """Full (averaged) gradients of this rank's blocks; absent where no rank had one.

        Checks first (same error on every rank, before the update exchange) that no frozen
        parameter became trainable and, until a step with real gradients has been checked, that
        every rank holds the same parameters in the same order (:mod:`distsoap.checks.replicas`).
        Under mode B the replica check runs in :class:`GradSync`, before the first gradient
        leaves (in backward); the frozen check after the exchange backward started is
        finished, so every rank has run the same collectives when it raises.
        """
        reduced = self.grad_sync.reduced_grads() if self.sync_gradients else None
        check_still_frozen(self.engine, self.frozen, self.name)
        if not self._checked_replicas and not self.sync_gradients:
            self._checked_replicas = self._check_replicas()
        if reduced is not None:  # by piece: this rank holds at most one piece of a parameter
            params = [self.params[piece.param] for piece in self.pieces]
            return {id(params[k]): g for k, g in reduced.items() if g is not None}
        grads = {}
        for k, piece in enumerate(self.pieces):
            if piece.owner == self.rank and self.params[piece.param].grad is not None:
                grads[id(self.params[piece.param])] = self._piece_grad(k)
        return grads

    def _check_replicas(self) -> bool:
        """Every rank's copy of every parameter (and, in mode A, its gradient) is the same.

        Returns:
            Whether the check counted (False when every gradient was zero or absent).
        """
        if not self.params:
            return True
        return check_copies(
            self.name,
            [self.engine.param_name(p) for p in self.params],
            [p.detach() for p in self.params],
            [p.grad for p in self.params],
            [0] * len(self.params),
            1,
            self.group,
            self.comm_device(),
            compare_grads=not self.sync_gradients,
        )

    def step(self) -> None:
        """Owners compute their blocks, then every rank applies every update."""
        grads = self._owned_grads()
        split = [self.params[i] for i in self.split]
        device = self.comm_device()
        nonfinite = agree_on_split(self.engine, split, grads, self.group, device, self.stats)
        updates = self.engine.compute_updates(grads, defer_refresh=True, nonfinite=nonfinite)
        error = self.engine.faults.take_pending()
        pending: list[PendingExchange] = []
        for bucket in self.buckets:
            part = self._pack_updates(bucket, updates, abort=error is not None)
            pending.append(launch_gather(bucket, part, self.rank, self.group, self.stats))
        # the refreshes only prepare the next step: run them while the updates travel
        self.engine.finish_refreshes()
        aborting: set[int] = set()
        groups = groups_by_param(self.engine.param_groups)
        split_pieces: dict[int, tuple[float, torch.Tensor]] = {}
        for bucket, exchange in zip(self.buckets, pending):
            (flags,), (payload,) = unpack_flagged([exchange.wait()], [bucket.piece_sizes])
            whole = []
            for k, flag, values in zip(bucket.params, flags, payload):
                piece = self.pieces[k]
                if piece.rows is None:
                    whole.append((piece.param, piece.owner, flag, values))
                    continue
                aborting |= {piece.owner} if read_flag(flag)[1] else set()
                split_pieces[k] = (flag, values)
            aborting |= self.apply_flagged(whole, self.params, self.params.__getitem__, groups)
        self._apply_split(split_pieces, groups)
        self.finish(error, aborting)

    def _apply_split(
        self, received: dict[int, tuple[float, torch.Tensor]], groups: dict[int, dict]
    ) -> None:
        """Put each split parameter's pieces back together and apply its update.

        Every piece of a parameter has an update or none (their owners decide alike: same
        step, same first call, the non-finite flags agreed); anything else is a bug, reported
        the same on every rank, which all received the same flags.
        """
        by_group: dict[int, tuple[dict, list, list]] = {}
        for i, keys in self.split.items():
            has = [read_flag(received[k][0])[0] for k in keys]
            if not has_update(self.engine, self.params[i], has):
                continue
            pieces = [(self.pieces[k].rows, received[k][1]) for k in keys]
            delta = join_pieces(self.specs[i], pieces)
            param = self.params[i]
            group = groups[id(param)]
            entry = by_group.setdefault(id(group), (group, [], []))
            entry[1].append(param)
            entry[2].append(delta)
        for group, targets, deltas in by_group.values():
            apply_deltas(targets, deltas, group)

    def _pack_updates(self, bucket, updates, abort: bool) -> torch.Tensor:
        """Pack this rank's part of a gather payload: per owned block a flag and the delta.

        Flags (see :func:`~distsoap.comm.update_flag`): 1 update, 0 none; +2 when this rank
        must stop training after the step.
        """
        mine = bucket.owned[self.rank]
        device = self._device()
        exact = torch.float64 if bucket.dtype == torch.float64 else torch.float32
        dtype = self.comm_dtype or exact
        blocks = []
        for k in mine:
            delta = updates.get(id(self.params[self.pieces[k].param]), (None, None))[1]
            blocks.append((update_flag(delta is not None, abort), delta, bucket.numels[k]))
        return pack_flagged(blocks, dtype, device)

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the averaged gradients to a total 2-norm of ``max_norm``; return the norm."""
        if not self.sync_gradients:
            params = [p for p in self.params if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return self.grad_sync.clip_(max_norm)
