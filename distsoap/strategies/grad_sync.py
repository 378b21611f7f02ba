"""Mode B's gradient synchronisation: gradients go to their owners during backward.

A post-accumulate-grad hook on every trainable parameter marks it ready. When every parameter
of a communication bucket is ready, the bucket is sent with one asynchronous uneven all-to-all
(:func:`distsoap.comm.launch_reduce`) while backward goes on. Buckets are launched strictly in
index order on every rank, so the collectives always match. Parameters that got no gradient on
this rank (unused in its forward) hold back their bucket until ``step()``, which sends them as
zeros with a flag saying so; a parameter no rank produced a gradient for is skipped, as in
single-process SOAP. Owners average what they receive the way DDP does (sum / world).

Before the first exchange a check may run (``check_before_exchange``: the data-parallel
strategy's replica check, :mod:`distsoap.checks.replicas`), on every rank at the same point, so
parameters listed in another order on some rank are caught before any gradient travels to the
wrong owner. It runs again before the next first exchange until it says it counted.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist

from distsoap.comm import (
    CommBucket,
    CommStats,
    PendingExchange,
    launch_reduce,
    pack_flagged,
    unpack_flagged,
)


class GradSync:
    """Owner-bound gradient synchronisation for replicated parameters without DDP.

    Args:
        params: trainable parameters.
        piece_params: per piece (indexed as in the buckets), the index of its parameter.
        piece_grad: a piece's local gradient (the parameter's, or its rows), or None.
        piece_shapes: per piece, the shape of its gradient (the parameter's, or its rows').
        buckets: the communication buckets, over pieces.
        rank: this rank in ``group``.
        group: the process group.
        stats: where to count the bytes sent.
        check_before_exchange: called (on every rank) before the first bucket is sent; returns
            whether the check counted (else it is called again before the next exchange).

    """

    def __init__(
        self,
        params: list[torch.Tensor],
        piece_params: list[int],
        piece_grad: Callable[[int], torch.Tensor | None],
        piece_shapes: list[tuple[int, ...]],
        buckets: list[CommBucket],
        rank: int,
        group: dist.ProcessGroup | None,
        stats: CommStats,
        check_before_exchange: Callable[[], bool] | None = None,
    ):
        self.params = params
        self.piece_grad = piece_grad
        self.piece_shapes = piece_shapes
        self.pieces_of: list[list[int]] = [[] for _ in params]
        for k, i in enumerate(piece_params):
            self.pieces_of[i].append(k)
        self.buckets = buckets
        self.rank = rank
        self.world = len(buckets[0].sizes) if buckets else 1
        self.group = group
        self.stats = stats
        self.bucket_of = {i: b.index for b in buckets for i in b.params}
        self._piece_sizes = [b.part_piece_sizes(rank) for b in buckets]
        self.enabled = True
        self.check_before_exchange = check_before_exchange
        self.checked = check_before_exchange is None
        self._reset()
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(params)
        ]

    def _reset(self) -> None:
        self.ready: set[int] = set()
        self.waiting = [len(b.params) for b in self.buckets]
        self.next_bucket = 0
        self.pending: list[PendingExchange] = []
        self._reduced: dict[int, torch.Tensor | None] | None = None

    def remove(self) -> None:
        """Remove the hooks (the strategy is being rebuilt)."""
        for handle in self._hooks:
            handle.remove()

    @contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the next backward outside the context synchronises."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def _make_hook(self, index: int):
        def hook(_param: torch.Tensor) -> None:
            if self.enabled:
                self._mark_ready(index)

        return hook

    def _mark_ready(self, index: int) -> None:
        if index in self.ready or self._reduced is not None:
            raise RuntimeError(
                "a gradient was synchronised twice before optimizer.step(): run the backward "
                "passes of accumulation micro-batches inside `with optimizer.no_sync():`"
            )
        self.ready.add(index)
        for piece in self.pieces_of[index]:
            self.waiting[self.bucket_of[piece]] -= 1
        self._launch_in_order(force=False)

    def _launch_in_order(self, force: bool) -> None:
        while self.next_bucket < len(self.buckets) and (
            force or self.waiting[self.next_bucket] == 0
        ):
            if not self.checked:  # every rank reaches this once per exchange, before bucket 0
                self.checked = self.check_before_exchange()
            self._launch(self.buckets[self.next_bucket])
            self.next_bucket += 1

    @torch.no_grad()
    def _launch(self, bucket: CommBucket) -> None:
        """Lay out this rank's gradients of the bucket owner by owner and send them."""
        device = self.params[0].device
        blocks = []
        for k in bucket.params:  # owner by owner: the payload order
            grad = self.piece_grad(k)
            blocks.append((float(grad is not None), grad, bucket.numels[k]))
        send = pack_flagged(blocks, bucket.dtype, device)
        self.pending.append(launch_reduce(bucket, send, self.rank, self.group, self.stats))

    @torch.no_grad()
    def reduced_grads(self) -> dict[int, torch.Tensor | None]:
        """The averaged gradients of this rank's pieces (None: no rank had a gradient).

        Keyed by piece index; flat (a piece in row form) or in the parameter's shape.

        Launches what backward left unsent, waits for everything, and resets for the next
        iteration; calling it again before the next backward returns the same result.
        """
        if self._reduced is not None:
            result = self._reduced
            self._reset()
            return result
        return self._finish(keep=False)

    def _finish(self, keep: bool) -> dict[int, torch.Tensor | None]:
        self._launch_in_order(force=True)
        result: dict[int, torch.Tensor | None] = {}
        for bucket, exchange in zip(self.buckets, self.pending):
            mine = bucket.owned[self.rank]
            received = exchange.wait().view(self.world, bucket.sizes[self.rank])
            if not mine:
                continue
            work = torch.float64 if bucket.dtype == torch.float64 else torch.float32
            summed = received.to(work).sum(dim=0)
            sizes = self._piece_sizes[bucket.index]  # flag, values, flag, values, ...
            (flags,), _ = unpack_flagged([summed], [sizes])  # how many ranks had a gradient
            # the whole part at once (flags included, already read): no kernel per parameter
            averaged = summed.div_(self.world).to(bucket.dtype)
            pieces = averaged.split(sizes)[1::2]  # views, the flags already read
            for k, count, piece in zip(mine, flags, pieces):
                result[k] = None if count == 0 else piece.view(self.piece_shapes[k])
        if keep:
            self._reduced = result
        else:
            self._reset()
        return result

    @torch.no_grad()
    def clip_(self, max_norm: float) -> torch.Tensor:
        """Clip the averaged gradients (held by their owners) to a total 2-norm of max_norm."""
        reduced = self._reduced if self._reduced is not None else self._finish(keep=True)
        device = self.params[0].device if self.params else torch.device("cpu")
        grads = [g for g in reduced.values() if g is not None]
        local = torch.zeros((), dtype=torch.float64, device=device)
        if grads:  # per-tensor norms fused (as torch's clip_grad_norm_), summed in fp64
            local += torch.stack(torch._foreach_norm(grads, 2)).double().square().sum()
        dist.all_reduce(local, group=self.group)
        self.stats.add("clip_norm", local.element_size() * 2 * (self.world - 1) // self.world)
        total = local.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for dtype, same in by_dtype.items():
            torch._foreach_mul_(same, coef.to(dtype))
        return total.to(grads[0].dtype if grads else torch.float32)  # like torch: the grads' dtype
