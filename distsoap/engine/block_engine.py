"""The block engine: SOAP on the blocks a strategy hands it, bucket by bucket.

Strategies decide which blocks this rank computes and move gradients and updates; they call
:meth:`BlockEngine.compute_updates` with the gradients of this rank's blocks and get back the
parameter deltas. The engine owns what makes that fast: the buckets (stacked state of
same-shape blocks), the cached step plans and the eigenbasis refreshes left due, which a
strategy runs with :meth:`BlockEngine.finish_refreshes` while its updates travel.

The engine reads the optimizer's ``param_groups`` and ``state`` (torch.optim's attributes,
through :class:`ParamHost`) and nothing else of it, so a strategy depends on the engine alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

import torch

from distsoap.checkpointing.state_dict import new_state_header
from distsoap.engine.blocks import BlockSpec, layout_signature, make_block_spec
from distsoap.engine.bucket import Bucket, block_tensor_keys
from distsoap.engine.elementwise import ElementwiseFn
from distsoap.engine.schedule import staggered_offsets
from distsoap.engine.step_plan import BucketStep
from distsoap.engine.storage import StorageDtypes
from distsoap.engine.update import (
    RefreshInputs,
    first_call,
    off_diagonal_masses,
    refresh_inputs,
    refresh_rows,
    soap_update,
)
from distsoap.faults import FaultPolicy, parameter_names

MAX_STEP_PLANS = 8
"""Step plans kept (one per set of parameters with gradients; usually one is enough, but models
whose parameters get gradients in changing subsets must not grow the cache without bound)."""

_cached_block_spec = lru_cache(maxsize=None)(make_block_spec)
_cached_layout_signature = lru_cache(maxsize=None)(layout_signature)  # checked every step
_cached_holding = lru_cache(maxsize=None)(BlockSpec.holding)

Updates = dict[int, tuple[dict[str, Any], torch.Tensor | None]]
"""``id(param)`` -> (its param group, its delta ``-step_size * U``, or None: no update)."""


def _by_member(bucket: Bucket, rows: list[int]) -> dict[int, list[int]]:
    """Positions into ``rows`` grouped by the member owning each row.

    A stack's matrices and a blocked parameter's blocks are one member: they are refreshed or
    skipped, and counted, together.
    """
    members: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        members.setdefault(bucket.owner_of_row[row], []).append(i)
    return members


class DeferredDrift(NamedTuple):
    """A split parameter's piece whose drift-guard verdict waits for its other owners."""

    param: torch.Tensor
    """The parameter (this rank holds some of its blocks)."""
    drifted: bool
    """Whether this piece's new bases, rounded to their storage dtype, drift too far."""
    new_bases: list[torch.Tensor | None]
    """The piece's new bases in the compute dtype, ``(rows, d, d)`` per factored dim."""


class ParamHost(Protocol):
    """What the engine reads of the optimizer: torch.optim's two attributes."""

    param_groups: list[dict[str, Any]]
    state: defaultdict[torch.Tensor, dict[str, Any]]


@dataclass(frozen=True)
class BucketKey:
    """What the blocks stacked in one bucket share."""

    group_index: int
    """Index of their param group."""
    block_shape: tuple[int, ...]
    """Shape of each block (after merging dims)."""
    factored: tuple[bool, ...]
    """Which block dims are rotated (have a Kronecker factor and basis)."""
    dtype: torch.dtype
    """Dtype of the factors, bases and the math."""
    device: torch.device
    """Where the stacked state lives."""
    precondition_frequency: int
    """Updates between eigenbasis refreshes (as recorded in each block's state)."""
    shampoo_beta: float
    """EMA coefficient of the factors (as recorded in each block's state)."""
    basis_dtype: torch.dtype | None = None
    """Storage dtype of the bases (a block the drift guard moved to fp32 leaves its bucket)."""


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """Dtype of factors, bases and the math: fp64 for fp64 parameters, else fp32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def check_gradient(grad: torch.Tensor) -> None:
    """Reject gradients SOAP cannot precondition (a complex parameter has a complex gradient)."""
    if grad.is_sparse:
        raise RuntimeError("SOAP does not support sparse gradients (use a dense embedding)")
    if grad.is_complex():
        raise RuntimeError("SOAP does not support complex parameters or gradients")


class BlockEngine:
    """Buckets, step plans and due refreshes of one optimizer's blocks.

    Args:
        host: the optimizer whose ``param_groups`` and ``state`` the engine reads (and whose
            per-parameter state it advances).
        data_format: ``"channels_first"`` or ``"channels_last"`` (4-D blocks).
        moment_dtype: dtype of ``exp_avg`` / ``exp_avg_sq`` (fp64 parameters use fp64).
        faults: what to do on non-finite gradients and failed eigenbases.
        refresh_schedule: ``"aligned"`` or ``"staggered"`` (:mod:`distsoap.engine.schedule`).
        elementwise: the rotated-Adam implementation (:mod:`distsoap.engine.elementwise`).
        factor_dtype: storage dtype of the factors (:mod:`distsoap.engine.storage`).
        basis_dtype: storage dtype of the bases.
        basis_orthogonality_tol: the drift guard's tolerance for bases stored below fp32.
    """

    def __init__(
        self,
        host: ParamHost,
        *,
        data_format: str,
        moment_dtype: torch.dtype,
        faults: FaultPolicy,
        refresh_schedule: str,
        elementwise: ElementwiseFn,
        factor_dtype: torch.dtype = torch.float32,
        basis_dtype: torch.dtype = torch.float32,
        basis_orthogonality_tol: float = 0.01,
        split_blocks: str = "auto",
    ):
        self.host = host
        self.data_format = data_format
        self.moment_dtype = moment_dtype
        self.faults = faults
        self.refresh_schedule = refresh_schedule
        self.elementwise = elementwise
        self.factor_dtype = factor_dtype
        self.basis_dtype = basis_dtype
        self.basis_orthogonality_tol = basis_orthogonality_tol
        self.split_blocks = split_blocks
        """``"auto"``: placement may give a parameter's blocks several owners; ``"never"``: every
        parameter stays whole on one owner (:func:`~distsoap.placement.place_blocks`)."""
        self.state_shape: Callable[[torch.Tensor], tuple[int, ...]] = lambda p: tuple(p.shape)
        """Shape of the tensor whose state is kept for a parameter (set by the strategy)."""
        self.state_rows: Callable[[torch.Tensor], tuple[int, ...] | None] = lambda p: None
        """The blocks of a parameter whose state this rank keeps, when only some (set by the
        strategy; None: the whole parameter). Their gradients and deltas are in row form."""
        self._buckets: dict[BucketKey, Bucket] = {}
        self._plans: dict[tuple, list[BucketStep]] = {}
        self._due_refreshes: list[tuple[Bucket, list[int], int]] = []
        self._offsets: dict[int, int] = {}
        self._names: tuple[tuple, dict[int, str]] | None = None
        self._deferred_drift: dict[int, DeferredDrift] = {}
        self.agree_skips: Callable[[dict[int, bool]], set[int]] | None = None
        """Set by a strategy that splits parameters: given, per split parameter held here whose
        adaptive refresh is due, whether all its rows here are still diagonal, returns the
        parameters (``id``) whose every piece is; called once per :meth:`finish_refreshes` on
        every rank (a collective)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups now (a framework may swap them)."""
        return self.host.param_groups

    @property
    def state(self) -> defaultdict[torch.Tensor, dict[str, Any]]:
        """The optimizer's per-parameter state now (``load_state_dict`` replaces it)."""
        return self.host.state

    def block_spec(
        self, param: torch.Tensor, group: dict[str, Any], shape: tuple[int, ...] | None = None
    ) -> BlockSpec:
        """How a parameter is seen as a block (its block shape and factored dims).

        Args:
            param: the parameter.
            group: its param group.
            shape: the shape of the tensor SOAP preconditions, when it is not ``param.shape``
                (a sharded parameter's full shape, or its local shard's). Ignored for a
                parameter of which this rank holds some blocks (:attr:`state_rows`): their spec
                comes from the whole parameter's (:attr:`state_shape`).
        """
        rows = self.state_rows(param)
        if rows is None:
            return self.whole_block_spec(param, group, shape)
        whole = self.whole_block_spec(param, group, tuple(self.state_shape(param)))
        return _cached_holding(whole, rows)

    def whole_block_spec(
        self, param: torch.Tensor, group: dict[str, Any], shape: tuple[int, ...] | None = None
    ) -> BlockSpec:
        """The block spec of a whole tensor of ``shape`` (default ``param.shape``).

        What a strategy places: it never asks which rows the installed strategy holds (while a
        strategy is being replaced, the old one's answer is about another placement).
        """
        return _cached_block_spec(
            tuple(param.shape if shape is None else shape),
            max_precond_dim=group["max_precond_dim"],
            merge_dims=group["merge_dims"],
            precondition_1d=group["precondition_1d"],
            data_format=self.data_format,
            stack_dims=group.get("stack_dims", 0),
            one_sided=group.get("one_sided", False),
            block_size=group.get("block_size"),
        )

    def storage_dtypes(
        self, param: torch.Tensor, state: dict[str, Any] | None = None
    ) -> StorageDtypes:
        """The dtypes ``param``'s state is stored in (fp64 parameters: fp64 throughout).

        ``state``: the block's state, if it has one (a block the drift guard moved keeps fp32
        bases).
        """
        if param.dtype == torch.float64:
            return StorageDtypes(torch.float64, torch.float64, torch.float64)
        kept = state is not None and state.get("basis_fallbacks", 0) > 0
        return StorageDtypes(
            self.moment_dtype, self.factor_dtype, torch.float32 if kept else self.basis_dtype
        )

    def state_element_bytes(self, param: torch.Tensor) -> tuple[int, int, int]:
        """Bytes per element of ``param``'s moments, factors and bases (placement)."""
        dtypes = self.storage_dtypes(param)
        return dtypes.moments.itemsize, dtypes.factors.itemsize, dtypes.bases.itemsize

    def param_name(self, param: torch.Tensor) -> str:
        """A name for ``param`` in messages (from named_parameters() input when given).

        The names of all parameters are built once per layout of the param groups (every
        refreshed block reports to the fault counters by name, so building them per call
        would cost O(parameters^2) on a refresh step).
        """
        signature = self.groups_signature()
        if self._names is None or self._names[0] != signature:
            self._names = (signature, parameter_names(self.param_groups))
        return self._names[1].get(id(param), "an unknown parameter")

    def groups_signature(self) -> tuple:
        """What a step plan depends on besides the stepped parameters (see step_plan)."""
        return tuple(
            (
                id(g),
                len(g["params"]),
                g["max_precond_dim"],
                g["merge_dims"],
                g["precondition_1d"],
                g.get("stack_dims", 0),
                g.get("one_sided", False),
                g.get("block_size"),
            )
            for g in self.param_groups
        )

    def reset(self) -> None:
        """Forget the buckets and the step plans using them (state is rebuilt from state[p])."""
        self._buckets = {}
        self._plans = {}

    def forget_offsets(self) -> None:
        """Recompute staggered refresh phases on next use (the strategy changed)."""
        self._offsets = {}

    def refresh_offset(self, param: torch.Tensor) -> int:
        """Return the block's refresh phase (0 for the aligned schedule)."""
        if self.refresh_schedule == "aligned":
            return 0
        if id(param) not in self._offsets:
            self._offsets = staggered_offsets(self)
        return self._offsets.get(id(param), 0)

    def compute_updates(
        self,
        grads: dict[int, torch.Tensor],
        defer_refresh: bool = False,
        nonfinite: set[int] | frozenset[int] = frozenset(),
    ) -> Updates:
        """SOAP on this rank's blocks: advance their state and return their parameter deltas.

        It does not touch the parameters.

        Args:
            grads: ``id(param)`` -> the gradient SOAP preconditions for that parameter: its full
                gradient (parameter shape), or, for sharded parameters, the assembled full
                gradient or (local mode) the local shard's. Only these parameters are stepped;
                their state lives on this rank, laid out for that gradient's shape. Zero-size
                gradients are no-ops: no state, no update (as torch's Adam).
            defer_refresh: leave the due eigenbasis refreshes to :meth:`finish_refreshes`
                (strategies run them while the updates travel).
            nonfinite: parameters (``id``) to skip as non-finite even if their gradient here is
                finite (a non-finite gradient in another rank's piece of the same parameter).

        Returns:
            ``id(param)`` -> (its param group, its delta ``-step_size * U`` in the gradient's
            shape, or None on a first call, which makes no update).

        """
        result: Updates = {}
        for grad in grads.values():
            check_gradient(grad)
        finite = self.faults.finite(grads)
        for key in nonfinite & finite.keys():
            finite[key] = False
        plan_key = (tuple(grads), self.groups_signature())
        plan = self._plans.get(plan_key) if all(finite.values()) else None
        if plan is None or any(self._buckets.get(b.key) is not b.bucket for b in plan):
            plan, reusable = self._plan_step(grads, finite, result)
            if reusable:
                if len(self._plans) >= MAX_STEP_PLANS:  # drop the oldest
                    del self._plans[next(iter(self._plans))]
                self._plans[plan_key] = plan
        for bucket_step in plan:
            deltas = self._step_bucket(bucket_step, grads)
            for param, delta in zip(bucket_step.params, deltas):
                result[id(param)] = (bucket_step.group, delta)
        if not defer_refresh:
            self.finish_refreshes()
        return result

    def finish_refreshes(self) -> None:
        """Run the eigenbasis refreshes the last ``compute_updates`` left due.

        They change only the state of the next step, so a strategy calls this while the
        step's updates are on the wire.
        """
        due, self._due_refreshes = self._due_refreshes, []
        agreed, measured = set(), {}
        if self.agree_skips is not None:
            agreed, measured = self._agreed_skips(due)
        drifted_any = False
        for position, (bucket, rows, key) in enumerate(due):
            group = self.param_groups[key.group_index]
            still_diagonal = None
            if group.get("refresh_tolerance", 0.0) > 0:

                def still_diagonal(mass, bucket=bucket, rows=rows, group=group):
                    return self._positions_to_refresh(bucket, rows, mass, group, agreed)

            tensors = bucket.select(rows)
            done = refresh_rows(
                tensors,
                list(range(len(rows))),
                len(key.block_shape),
                key.dtype,
                self.basis_orthogonality_tol,
                bucket.padding_of(rows),
                still_diagonal,
                measured.pop(position, None),
            )
            if not done.refreshed:
                continue  # every block skipped: its state is untouched
            bucket.write_back(rows, tensors)
            refreshed_rows = [rows[position] for position in done.refreshed]
            for member, positions in _by_member(bucket, refreshed_rows).items():
                param = bucket.params[member]
                state = self.state[param]
                member_failed = any(done.refreshed[i] in done.failed for i in positions)
                self.faults.basis(self.param_name(param), state, member_failed)
                drifted = any(i in done.drifted for i in positions)
                if self._defers_drift(param, state):
                    index = torch.tensor(positions, device=state["exp_avg"].device)
                    mine = [None if b is None else b.index_select(0, index) for b in done.new_bases]
                    self._deferred_drift[id(param)] = DeferredDrift(param, drifted, mine)
                elif drifted:
                    self._keep_fp32_bases(param, state, done.new_bases, positions)
                    drifted_any = True
        if drifted_any:
            self.reset()  # those blocks move to buckets of fp32 bases

    def _agreed_skips(
        self, due: list[tuple[Bucket, list[int], BucketKey]]
    ) -> tuple[set[int], dict[int, RefreshInputs]]:
        """The split parameters whose every piece is still diagonal (adaptive refresh).

        One process skips a parameter's refresh only if all its blocks are still diagonal, so
        the owners of a split parameter's pieces decide together: each measures the masses of
        its due pieces first, then :attr:`agree_skips` combines them (every rank, every call).
        The measuring computes the ``GG Q`` products of every due row of the buckets holding
        such pieces; the refresh that follows reuses them.

        Returns:
            The agreed parameters (``id``), and per position in ``due`` the refresh inputs
            measured there.
        """
        local: dict[int, bool] = {}
        measured: dict[int, RefreshInputs] = {}
        for position, (bucket, rows, key) in enumerate(due):
            group = self.param_groups[key.group_index]
            if not group.get("refresh_tolerance", 0.0) > 0:
                continue
            members = {
                m: p
                for m, p in _by_member(bucket, rows).items()
                if self.state_rows(bucket.params[m]) is not None
            }
            if not members:
                continue
            every_row = list(range(len(rows)))
            padding = bucket.padding_of(rows)
            tensors = bucket.select(rows)
            inputs = refresh_inputs(tensors, every_row, len(key.block_shape), key.dtype, padding)
            measured[position] = inputs
            mass = off_diagonal_masses(inputs)
            below = [] if mass is None else (mass < group["refresh_tolerance"]).tolist()
            for member, member_positions in members.items():
                local[id(bucket.params[member])] = bool(below) and all(
                    below[i] for i in member_positions
                )
        return self.agree_skips(local), measured

    def _positions_to_refresh(
        self,
        bucket: Bucket,
        rows: list[int],
        mass: torch.Tensor | None,
        group: dict[str, Any],
        agreed: set[int] = frozenset(),
    ) -> list[int]:
        """The adaptive refresh: which of the due ``rows`` must refresh now (positions).

        A block skips its refresh while its current bases still diagonalise its factors (the
        off-diagonal ``mass`` below the group's ``refresh_tolerance`` for every matrix of it),
        at most ``max_skipped_refreshes`` times in a row; ``refresh_skips`` (in a row) and
        ``skipped_refreshes`` (in all) count them. A piece of a split parameter goes by
        ``agreed`` (:meth:`_agreed_skips`): whether every piece of it is still diagonal.
        """
        if mass is None:
            return list(range(len(rows)))
        below = (mass < group["refresh_tolerance"]).tolist()
        kept = []
        for member, positions in _by_member(bucket, rows).items():
            param = bucket.params[member]
            state = self.state[param]
            skips = state.get("refresh_skips", 0)
            if self.state_rows(param) is not None:
                diagonal = id(param) in agreed
            else:
                diagonal = all(below[i] for i in positions)
            if diagonal and skips < group["max_skipped_refreshes"]:
                state["refresh_skips"] = skips + 1
                state["skipped_refreshes"] = state.get("skipped_refreshes", 0) + 1
            else:
                state["refresh_skips"] = 0
                kept += positions
        return sorted(kept)

    def _keep_fp32_bases(
        self,
        param: torch.Tensor,
        state: dict[str, Any],
        new_bases: list[torch.Tensor | None],
        positions: list[int],
    ) -> None:
        """The drift guard: store this block's new bases in the compute dtype from now on."""
        index = torch.tensor(positions, device=state["exp_avg"].device)
        stacked = state["exp_avg"].dim() > len(new_bases)  # a stack leads with its rows
        for dim, basis in enumerate(new_bases):
            if basis is not None:
                mine = basis.index_select(0, index)
                state[f"basis_{dim}"] = mine if stacked else mine[0]
        self.faults.basis_fallback(self.param_name(param), state)

    def _plan_step(
        self, grads: dict[int, torch.Tensor], finite: dict[int, bool], result: Updates
    ) -> tuple[list[BucketStep], bool]:
        """Route this step's blocks: first calls and skipped blocks now, the rest into buckets.

        First calls and non-finite skips are handled here and recorded in ``result``.

        Returns:
            The bucket steps of the blocks to update, and whether the plan may be reused (no
            first call and no skip this step).
        """
        reusable = True
        plan: list[BucketStep] = []
        for index, group in enumerate(self.param_groups):
            ready: dict[BucketKey, list[torch.Tensor]] = defaultdict(list)
            for param in group["params"]:
                grad = grads.get(id(param))
                if grad is None or grad.numel() == 0:  # zero-size: nothing to precondition
                    continue
                state = self.state[param]
                if not finite[id(param)]:
                    self.faults.nonfinite(self.param_name(param), state)
                    result[id(param)] = (group, None)
                    reusable = False
                    continue
                spec = self.block_spec(param, group, tuple(grad.shape))
                if not state.get("bases_ready", False):
                    self._first_call(param, grad, spec, group, state)
                    result[id(param)] = (group, None)
                    reusable = False
                    continue
                layout = _cached_layout_signature(spec)
                if state.get("block_layout", layout) != layout:
                    raise ValueError(
                        f"parameter {self.param_name(param)}: its SOAP state is laid out as "
                        f"{state['block_layout']}, but max_precond_dim / merge_dims / "
                        f"precondition_1d now give {layout}; these cannot change during training"
                    )
                key = BucketKey(
                    group_index=index,
                    block_shape=spec.block_shape,
                    factored=spec.factored,
                    dtype=compute_dtype(param),
                    device=param.device,
                    precondition_frequency=state["precondition_frequency"],
                    shampoo_beta=state["shampoo_beta"],
                    basis_dtype=(
                        state[f"basis_{spec.factored.index(True)}"].dtype
                        if any(spec.factored)
                        else None
                    ),
                )
                ready[key].append(param)
            for key, params in ready.items():
                bucket = self._bucket(key, params)
                states = [self.state[p] for p in params]
                plan.append(
                    BucketStep(
                        key=key,
                        bucket=bucket,
                        group=group,
                        params=params,
                        states=states,
                        rows=[r for p in params for r in bucket.rows_of(p)],
                        specs=[
                            self.block_spec(p, group, tuple(grads[id(p)].shape)) for p in params
                        ],
                        offsets=[s.get("refresh_offset", 0) for s in states],
                    )
                )
        return plan, reusable

    def _first_call(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        spec: BlockSpec,
        group: dict[str, Any],
        state: dict[str, Any],
    ) -> None:
        if "step" not in state:
            header = new_state_header(group, spec, self.refresh_offset(param))
            for key, value in header.items():
                state.setdefault(key, value)  # keeps a non-finite skip counted before
        dtype = compute_dtype(param)
        block = spec.to_rows(grad).to(dtype)
        if group.get("maximize", False):
            block = block.neg()  # not in place: it may be the caller's gradient
        storage = self.storage_dtypes(param, state)
        defer = self._defers_drift(param, state)
        decomposed, drifted, new_bases = first_call(
            state, spec, block, storage, self.basis_orthogonality_tol, defer_drift=defer
        )
        if not decomposed or state["bases_ready"]:
            self.faults.basis(self.param_name(param), state, failed=not decomposed)
        if defer and state["bases_ready"]:
            self._deferred_drift[id(param)] = DeferredDrift(param, drifted, new_bases)
        elif drifted:
            self.faults.basis_fallback(self.param_name(param), state)

    def _defers_drift(self, param: torch.Tensor, state: dict[str, Any]) -> bool:
        """Whether the drift guard's verdict on ``param`` waits for :meth:`settle_drift`.

        For the blocks of a split parameter held here (:attr:`state_rows`) whose bases are
        stored below the compute dtype: single-process SOAP moves a whole parameter to fp32
        bases when any of its blocks drifts, so the owners of its pieces decide together.
        """
        if self.state_rows(param) is None:
            return False
        return self.storage_dtypes(param, state).bases.itemsize < compute_dtype(param).itemsize

    def deferred_drift(self) -> dict[int, bool]:
        """``id(param)`` -> whether this rank's piece drifted, for every verdict not settled."""
        return {key: entry.drifted for key, entry in self._deferred_drift.items()}

    def forget_deferred_drift(self) -> None:
        """Drop the unsettled verdicts (the state they were about was replaced by a load)."""
        self._deferred_drift = {}

    def settle_drift(self, drifted: set[int], considered: set[int]) -> None:
        """Settle the deferred drift verdicts on ``considered`` parameters (``id``).

        The ``drifted`` ones keep fp32 bases: their pieces here take the new bases in the
        compute dtype, as a single process would have stored them when it refreshed (nothing
        has used the rounded ones yet: the strategy settles before the next update). The
        others keep the rounded bases. Verdicts on parameters not considered wait for their
        own step call (DeepSpeed steps one param group per call).
        """
        entries = {k: e for k, e in self._deferred_drift.items() if k in considered}
        for key in entries:
            del self._deferred_drift[key]
        moved = False
        for key, entry in entries.items():
            if key in drifted:
                state = self.state[entry.param]
                rows = next(b.shape[0] for b in entry.new_bases if b is not None)
                self._keep_fp32_bases(entry.param, state, entry.new_bases, list(range(rows)))
                moved = True
        if moved:
            self.reset()  # those blocks move to buckets of fp32 bases

    @staticmethod
    def _padding(key: BucketKey, specs: list[BlockSpec]) -> list[torch.Tensor | None] | None:
        """Per block dim, the members' padding masks row by row (None: nobody is padded)."""
        per_member = [s.padding() if s.blocked else None for s in specs]
        if all(m is None or all(d is None for d in m) for m in per_member):
            return None
        masks: list[torch.Tensor | None] = []
        for dim, size in enumerate(key.block_shape):
            rows = [
                m[dim]
                if m is not None and m[dim] is not None
                else torch.zeros(s.rows, size, dtype=torch.bool)
                for s, m in zip(specs, per_member, strict=True)
            ]
            mask = torch.cat(rows).to(key.device)
            masks.append(mask if bool(mask.any()) else None)
        return masks

    def _bucket(self, key: BucketKey, params: list[torch.Tensor]) -> Bucket:
        """The bucket for ``key``, (re)built if some of ``params`` are not members yet."""
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.holds(params):
            return bucket
        members = list(bucket.params) if bucket is not None else []
        known = {id(p) for p in members}
        members += [p for p in params if id(p) not in known]
        states = [self.state[p] for p in members]
        group = self.param_groups[key.group_index]
        specs = [self.block_spec(p, group, self.state_shape(p)) for p in members]
        counts = [s.rows if s.stacked else None for s in specs]  # stacks and blocks: rows
        bucket = Bucket(members, states, block_tensor_keys(key.factored), counts)
        bucket.padding = self._padding(key, specs)
        if bucket.padding is not None:
            real = torch.ones(len(bucket), dtype=key.dtype, device=key.device)
            for size, mask in zip(key.block_shape, bucket.padding, strict=True):
                real *= size if mask is None else size - mask.sum(dim=1)
            bucket.real_numels = real
        self._buckets[key] = bucket
        return bucket

    def _step_bucket(
        self, bucket_step: BucketStep, grads: dict[int, torch.Tensor]
    ) -> list[torch.Tensor]:
        key = bucket_step.key
        stacked = bucket_step.stack_grads(grads, key.dtype)  # a new tensor
        if bucket_step.group.get("maximize", False):
            stacked.neg_()
        steps = []
        for state in bucket_step.states:
            state["step"] += 1
            steps.append(state["step"])
        steps = bucket_step.per_row(steps)
        bucket, rows = bucket_step.bucket, bucket_step.rows
        tensors = bucket.select(rows)
        deltas, due = soap_update(
            tensors,
            stacked,
            steps,
            bucket_step.group,
            key.shampoo_beta,
            key.precondition_frequency,
            bucket_step.per_row(bucket_step.offsets),
            self.elementwise,
            bucket.real_numels_of(rows),
        )
        bucket.write_back(rows, tensors)
        if due:
            self._due_refreshes.append((bucket, [rows[i] for i in due], key))
        return bucket_step.split_deltas(deltas)
