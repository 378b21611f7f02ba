"""Replicated parameters, sharded SOAP: each block's state and work on exactly one owner rank.

Mode A (``strategy="ddp"``): the model is wrapped in DistributedDataParallel, so ``.grad`` is
already averaged and equal on every rank. Owners compute their blocks' updates; the updates are
all-gathered bucket by bucket (each bucket launched asynchronously as soon as this rank's part is
computed) and every rank applies the same values.

Mode B (``strategy="zero2"``): no wrapper. :class:`~distsoap.strategies.grad_sync.GradSync`
sends each owner the gradients of its blocks during backward; the rest is as in mode A.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist

from distsoap.checks.replicas import check_copies
from distsoap.comm import (
    PendingExchange,
    build_buckets,
    launch_gather,
    pack_flagged,
    unpack_flagged,
    update_flag,
)
from distsoap.engine.block_engine import BlockEngine
from distsoap.placement import assign_owners, block_cost
from distsoap.strategies.base import Strategy, groups_by_param
from distsoap.strategies.frozen import check_still_frozen, frozen_params
from distsoap.strategies.grad_sync import GradSync


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
        """Owners and buckets from the trainable parameters; identical on every rank."""
        engine = self.engine
        self.params: list[torch.Tensor] = []
        self.frozen = frozen_params([p for g in engine.param_groups for p in g["params"]])
        costs = []
        for group in engine.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                self.params.append(p)
                spec = engine.block_spec(p, group)
                frequency = group["precondition_frequency"]
                costs.append(block_cost(spec, frequency, *engine.state_element_bytes(p)))
        self.costs = costs
        self.owners = assign_owners(costs, self.world)
        self._owner_of = {id(p): o for p, o in zip(self.params, self.owners)}
        element = max(p.element_size() for p in self.params) if self.params else 4
        self.buckets = build_buckets(
            [p.numel() for p in self.params],
            [p.dtype for p in self.params],
            self.owners,
            self.world,
            max(1, int(self.bucket_cap_mb * 2**20 / element)),
        )
        if self.sync_gradients:
            self.close()
            self.grad_sync = GradSync(
                self.params,
                self.buckets,
                self.rank,
                self.group,
                self.stats,
                check_before_exchange=self._check_replicas,
            )

    def owned_params(self) -> list[torch.Tensor]:
        """The parameters whose SOAP state lives on this rank."""
        return [p for p, o in zip(self.params, self.owners) if o == self.rank]

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
        """Whether this rank is ``param``'s owner (state keeps the parameter's own shape)."""
        return self._owner_of.get(id(param)) == self.rank

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
        if reduced is not None:
            return {id(self.params[i]): g for i, g in reduced.items() if g is not None}
        return {
            id(p): p.grad
            for p, owner in zip(self.params, self.owners)
            if owner == self.rank and p.grad is not None
        }

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
        updates = self.engine.compute_updates(grads, defer_refresh=True)
        error = self.engine.faults.take_pending()
        pending: list[PendingExchange] = []
        for bucket in self.buckets:
            part = self._pack_updates(bucket, updates, abort=error is not None)
            pending.append(launch_gather(bucket, part, self.rank, self.group, self.stats))
        # the refreshes only prepare the next step: run them while the updates travel
        self.engine.finish_refreshes()
        aborting: set[int] = set()
        groups = groups_by_param(self.engine.param_groups)
        for bucket, exchange in zip(self.buckets, pending):
            (flags,), (pieces,) = unpack_flagged([exchange.wait()], [bucket.piece_sizes])
            received = zip(bucket.params, (self.owners[i] for i in bucket.params), flags, pieces)
            aborting |= self.apply_flagged(received, self.params, self.params.__getitem__, groups)
        self.finish(error, aborting)

    def _pack_updates(self, bucket, updates, abort: bool) -> torch.Tensor:
        """Pack this rank's part of a gather payload: per owned block a flag and the delta.

        Flags (see :func:`~distsoap.comm.update_flag`): 1 update, 0 none; +2 when this rank
        must stop training after the step.
        """
        mine = bucket.owned[self.rank]
        device = self.params[mine[0]].device if mine else self._device()
        exact = torch.float64 if bucket.dtype == torch.float64 else torch.float32
        dtype = self.comm_dtype or exact
        blocks = []
        for i in mine:
            delta = updates.get(id(self.params[i]), (None, None))[1]
            blocks.append((update_flag(delta is not None, abort), delta, bucket.numels[i]))
        return pack_flagged(blocks, dtype, device)

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the averaged gradients to a total 2-norm of ``max_norm``; return the norm."""
        if not self.sync_gradients:
            params = [p for p in self.params if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return self.grad_sync.clip_(max_norm)
