"""The SOAP step on a stack of same-shape blocks (docs/algorithm.md, "Every later call").

Pure computation: given a block's stacked state and gradients, produce the parameter deltas and
advance the state. Placement and communication (who computes which block) live elsewhere; every
strategy calls these two functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from distsoap.engine.blocking import PADDING_EIGENVALUE, shifted_for_padding
from distsoap.engine.blocks import BlockSpec
from distsoap.engine.storage import StorageDtypes, drifting_rows, store_back, widened
from distsoap.hyperparams import group_lr
from distsoap.kernels import rotated_adam_direction
from distsoap.math.adaptive import off_diagonal_mass_of_products
from distsoap.math.bases import basis_products, initial_basis, refresh_bases
from distsoap.math.rotations import rotate_in, rotate_out, update_factors


def step_size(group: dict[str, Any], step: int) -> float:
    """``lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` with bias correction, else ``lr``."""
    lr = group_lr(group)
    if not group["correct_bias"]:
        return lr
    beta1, beta2 = group["betas"]
    return lr * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)


def _per_block(values: list[float], like: torch.Tensor) -> torch.Tensor | float:
    """A float when every block shares the value, else a ``(B,)`` tensor."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _stacked(tensors: dict[str, torch.Tensor], prefix: str, rank: int) -> list:
    return [tensors.get(f"{prefix}_{dim}") for dim in range(rank)]


def soap_update(
    tensors: dict[str, torch.Tensor],
    grads: torch.Tensor,
    steps: list[int],
    group: dict[str, Any],
    shampoo_beta: float,
    precondition_frequency: int,
    offsets: list[int] | None = None,
    elementwise: Callable = rotated_adam_direction,
    real_numels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """One SOAP update for a stack of blocks whose bases are initialised.

    Steps 1-10b of docs/algorithm.md; the refresh (10c-d) of the rows that are due is left to
    :func:`refresh_rows`, so that a caller can run it while this step's communication is in
    flight: it changes only the state the *next* step uses.

    Args:
        tensors: the stacked state: ``exp_avg``, ``exp_avg_sq`` ``(B, *block)`` and, per factored
            block dim i, ``factor_i`` and ``basis_i`` ``(B, d_i, d_i)``. Updated in place, or
            replaced by new tensors (refreshed bases, permuted second moments); the caller
            stores the dict's final contents.
        grads: gradients ``(B, *block)`` in the factors' dtype.
        steps: each block's update count *after* this update (t in docs/algorithm.md).
        group: the param group (lr, betas, eps, correct_bias, normalize_grads).
        shampoo_beta: the blocks' factor EMA coefficient.
        precondition_frequency: refresh a block's bases when ``t + offset`` is a multiple of
            this.
        offsets: each block's refresh phase in ``[0, precondition_frequency)`` (staggered
            schedule); None: all 0, the reference's aligned schedule.
        elementwise: the rotated-Adam implementation (eager, compiled or Triton dispatch).
        real_numels: ``(B,)`` elements of each block that are not padding (blocked
            parameters), for ``normalize_grads``' RMS; None: every element is real.

    Returns:
        The parameter deltas ``-step_size * U`` ``(B, *block)`` (weight decay not included) and
        the rows whose bases are due for a refresh.

    """
    rank = grads.dim() - 1
    bases = widened(_stacked(tensors, "basis", rank), grads.dtype)  # stored low: read once
    stored_factors = _stacked(tensors, "factor", rank)
    factors = widened(stored_factors, grads.dtype)
    beta1, beta2 = group["betas"]

    sizes = [-step_size(group, t) for t in steps]
    scale = 1.0 if group["normalize_grads"] else _per_block(sizes, grads)
    grad_rotated = rotate_in(grads, bases)
    direction = elementwise(
        tensors["exp_avg"], tensors["exp_avg_sq"], grad_rotated, beta1, beta2, group["eps"], scale
    )
    delta = rotate_out(direction, bases)
    if group["normalize_grads"]:
        flat = delta.reshape(delta.shape[0], -1)
        if real_numels is None:
            rms = flat.square().mean(dim=1).sqrt().add_(1e-30)
        else:  # padding holds zeros: the mean over the real elements only
            rms = (flat.square().sum(dim=1) / real_numels).sqrt().add_(1e-30)
        per_block = _per_block(sizes, delta)  # shared: a fill, no host-to-device copy
        if not isinstance(per_block, torch.Tensor):
            per_block = torch.full_like(rms, per_block)
        delta = delta * (per_block / rms).view(-1, *[1] * rank)

    update_factors(factors, grads, shampoo_beta)
    store_back(stored_factors, factors)  # rounded once where stored low
    if not any(b is not None for b in bases):
        return delta, []
    offsets = offsets or [0] * len(steps)
    due = [
        row
        for row, (t, o) in enumerate(zip(steps, offsets))
        if (t + o) % precondition_frequency == 0
    ]
    return delta, due


class Refreshed(NamedTuple):
    """What :func:`refresh_rows` did."""

    refreshed: list[int]
    """Positions (into the ``rows`` asked for) that were refreshed; the others were skipped."""
    failed: list[int]
    """Rows (of the whole stack) for which a refresh failed every retry."""
    drifted: list[int]
    """Positions into ``refreshed`` whose new bases drift past the drift guard's tolerance."""
    new_bases: list[torch.Tensor | None]
    """Per block dim, the new bases of the refreshed rows in the compute dtype,
    ``(len(refreshed), d, d)`` (None where not factored)."""


class RefreshInputs(NamedTuple):
    """What a refresh of some rows of a stack starts from, in the compute dtype."""

    stored: list[torch.dtype | None]
    """Per block dim, the storage dtype of the bases (None where not factored)."""
    bases: list[torch.Tensor | None]
    """Per block dim, the rows' current bases."""
    factors: list[torch.Tensor | None]
    """Per block dim, the rows' factors."""
    shifted: list[torch.Tensor | None]
    """The factors with their padding's eigenvalue shifted (:mod:`distsoap.engine.blocking`)."""
    padding: list[torch.Tensor | None] | None
    """Per block dim, the rows' padding masks, or None."""
    products: list[torch.Tensor | None]
    """Per block dim, ``GG Q`` of the shifted factors (:func:`basis_products`)."""


def refresh_inputs(
    tensors: dict[str, torch.Tensor],
    rows: list[int],
    rank: int,
    compute: torch.dtype = torch.float32,
    padding: list[torch.Tensor | None] | None = None,
) -> RefreshInputs:
    """The bases, factors and ``GG Q`` products a refresh of ``rows`` starts from.

    Args: as :func:`refresh_rows`.
    """
    index = None if len(rows) == tensors["exp_avg"].shape[0] else _index(rows, tensors)

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return (t if index is None else t.index_select(0, index)).to(compute)

    stored = [b.dtype if b is not None else None for b in _stacked(tensors, "basis", rank)]
    bases = [pick(b) for b in _stacked(tensors, "basis", rank)]
    factors = [pick(f) for f in _stacked(tensors, "factor", rank)]
    if padding is not None and index is not None:
        padding = [m if m is None else m.index_select(0, index) for m in padding]
    shifted = shifted_for_padding(factors, padding)
    return RefreshInputs(stored, bases, factors, shifted, padding, basis_products(shifted, bases))


def off_diagonal_masses(inputs: RefreshInputs) -> torch.Tensor | None:
    """The adaptive refresh's test of every row (``(rows,)``), from the refresh's own products.

    The mass is that of the real factor: its padding reads 0 (``GG Q`` of the real factor is
    ``(shifted GG) Q - PADDING_EIGENVALUE diag(mask) Q``). None for a block without factors.
    """
    unshifted = inputs.products
    if inputs.padding is not None:
        unshifted = [
            p if p is None or m is None else p - PADDING_EIGENVALUE * m.to(b).unsqueeze(-1) * b
            for p, m, b in zip(inputs.products, inputs.padding, inputs.bases, strict=True)
        ]
    return off_diagonal_mass_of_products(inputs.factors, inputs.bases, unshifted)


def refresh_rows(
    tensors: dict[str, torch.Tensor],
    rows: list[int],
    rank: int,
    compute: torch.dtype = torch.float32,
    drift_tol: float | None = None,
    padding: list[torch.Tensor | None] | None = None,
    still_diagonal: Callable[[torch.Tensor], list[int]] | None = None,
    inputs: RefreshInputs | None = None,
) -> Refreshed:
    """Refresh the bases of some rows of the stack, carrying the moments into the new bases.

    Args:
        tensors: the stacked state (see :func:`soap_update`), updated in place.
        rows: the rows to refresh.
        rank: the number of block dims.
        compute: the dtype of the math (factors and bases stored lower are widened to it).
        drift_tol: report rows whose new bases, rounded to their storage dtype, lose more
            orthogonality than this (:mod:`distsoap.engine.storage`); None: do not measure.
        padding: per block dim, the ``(B, d)`` padding masks of the stack's rows (blocked
            parameters, :mod:`distsoap.engine.blocking`), or None.
        still_diagonal: the adaptive refresh. Given the ``(len(rows),)`` off-diagonal masses
            (:func:`off_diagonal_masses`, from the same ``GG Q`` products the refresh uses), it
            returns the positions to refresh; the others keep their state untouched. None:
            refresh every row.
        inputs: :func:`refresh_inputs` of these rows and this state, when the caller has them
            already (a split parameter's owners measured the masses first); else computed here.
    """
    index = None if len(rows) == tensors["exp_avg"].shape[0] else _index(rows, tensors)

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return (t if index is None else t.index_select(0, index)).to(compute)

    def put(key: str, value: torch.Tensor) -> None:
        current = tensors[key]
        if index is None:
            current.copy_(value)
        else:
            current.index_copy_(0, index, value.to(current.dtype))

    if inputs is None:
        inputs = refresh_inputs(tensors, rows, rank, compute, padding)
    stored, bases, _, shifted, _, products = inputs
    refreshed = list(range(len(rows)))
    if still_diagonal is not None:
        refreshed = sorted(still_diagonal(off_diagonal_masses(inputs)))
        if not refreshed:
            return Refreshed([], [], [], [None] * rank)
        if len(refreshed) < len(rows):
            keep = torch.tensor(refreshed, device=tensors["exp_avg"].device)
            bases, shifted, products = (
                [t if t is None else t.index_select(0, keep) for t in ts]
                for ts in (bases, shifted, products)
            )
            rows = [rows[i] for i in refreshed]
            index = _index(rows, tensors)
    exp_avg = rotate_out(pick(tensors["exp_avg"]), bases)  # a. back to weight space
    new_bases, exp_avg_sq, failed = refresh_bases(
        shifted, bases, pick(tensors["exp_avg_sq"]), products
    )
    put("exp_avg", rotate_in(exp_avg, new_bases))  # d. into the new bases
    put("exp_avg_sq", exp_avg_sq)
    for dim, basis in enumerate(new_bases):
        if basis is not None:
            put(f"basis_{dim}", basis)
    drifted = [] if drift_tol is None else drifting_rows(new_bases, stored, drift_tol)
    return Refreshed(refreshed, sorted(rows[i] for i in failed), drifted, new_bases)


def _index(rows: list[int], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.tensor(rows, device=tensors["exp_avg"].device)


def new_block_tensors(
    spec: BlockSpec,
    dtype: torch.dtype,
    moment_dtype: torch.dtype,
    device: torch.device,
    storage: StorageDtypes | None = None,
) -> dict[str, torch.Tensor]:
    """Zero moments, zero factors and identity bases for a block of this layout.

    A stacked block's tensors lead with its rows: moments ``(rows, *block_shape)``, factors and
    bases ``(rows, d, d)``. ``storage`` gives the dtypes (default: moments in ``moment_dtype``,
    factors and bases in ``dtype``).
    """
    storage = storage or StorageDtypes(moment_dtype, dtype, dtype)
    lead = (spec.rows,) if spec.stacked else ()
    tensors = {
        "exp_avg": torch.zeros(spec.state_shape, dtype=storage.moments, device=device),
        "exp_avg_sq": torch.zeros(spec.state_shape, dtype=storage.moments, device=device),
    }
    for dim, size in enumerate(spec.block_shape):
        if spec.factored[dim]:
            eye = torch.eye(size, dtype=storage.bases, device=device)
            tensors[f"factor_{dim}"] = torch.zeros(
                *lead, size, size, dtype=storage.factors, device=device
            )
            tensors[f"basis_{dim}"] = eye.expand(*lead, size, size).clone() if lead else eye
    return tensors


def first_call(
    state: dict[str, Any],
    spec: BlockSpec,
    grads: torch.Tensor,
    storage: StorageDtypes,
    drift_tol: float | None = None,
    defer_drift: bool = False,
) -> tuple[bool, bool, list[torch.Tensor | None]]:
    """First call for a block: create its state, accumulate the factors, and compute the bases.

    No update is made and the step counter stays 0. The state must already hold ``step``,
    ``shampoo_beta`` and ``precondition_frequency``. When the gradient or a factor is all zero
    or not finite (e.g. the all-zero gradient of torch DCP's state-initialising step) the call
    is discarded: the factors are reset to zero, the bases are provisional (identity) and
    ``bases_ready`` stays False, so the next call with a real gradient is the first call again
    instead of freezing a meaningless basis (the public reference would keep it). A stack of
    matrices (``stack_dims``) starts together: the call is discarded unless every matrix's
    gradient is usable (an expert that got no tokens makes the whole stack wait a step).

    If the eigendecomposition of a factor fails every retry (:mod:`distsoap.math.bases`), the
    call is discarded the same way and reported.

    Args:
        state: the block's state dict, filled in place.
        spec: the block's layout.
        grads: the block's gradient as rows, ``(rows, *block_shape)``, in the compute dtype.
        storage: the dtypes its state is stored in.
        drift_tol: the drift guard's tolerance (:mod:`distsoap.engine.storage`); bases that
            would drift past it are stored in the compute dtype instead. None: not measured.
        defer_drift: store the bases in their storage dtype even if they drift (the caller
            decides later, with the returned bases: a split parameter's owners decide together).

    Returns:
        False when an eigendecomposition failed, else True; whether the bases drifted (then
        stored in the compute dtype, unless deferred); and the new bases in the compute dtype
        (None where a dim has none, or the call was discarded).

    """
    if "exp_avg" not in state:
        state.update(new_block_tensors(spec, grads.dtype, storage.moments, grads.device, storage))

    def as_rows(tensor: torch.Tensor) -> torch.Tensor:  # a view: writes reach the state
        return tensor if spec.stacked else tensor.unsqueeze(0)

    stored = [
        as_rows(state[f"factor_{dim}"]) if has_factor else None
        for dim, has_factor in enumerate(spec.factored)
    ]
    factors = widened(stored, grads.dtype)
    update_factors(factors, grads, state["shampoo_beta"])
    usable = [grads] + [f for f in factors if f is not None]
    ready = all(  # every row (matrix of a stack) finite and not all zero
        bool(torch.isfinite(t).all()) and bool(t.reshape(t.shape[0], -1).abs().amax(1).gt(0).all())
        for t in usable
    )
    decomposed = True
    new_bases: list[torch.Tensor | None] = [None] * len(factors)
    if ready:
        padding = spec.padding() if spec.blocked else None
        if padding is not None:
            padding = [None if m is None else m.to(grads.device) for m in padding]
        for dim, factor in enumerate(shifted_for_padding(factors, padding)):
            if factor is not None:
                basis, failed = initial_basis(factor)
                decomposed = decomposed and not failed
                new_bases[dim] = basis
    ready = ready and decomposed
    basis_dtypes = [
        state[f"basis_{d}"].dtype if f is not None else None for d, f in enumerate(factors)
    ]
    drifted = (
        ready and drift_tol is not None and bool(drifting_rows(new_bases, basis_dtypes, drift_tol))
    )
    for dim, factor in enumerate(factors):
        if factor is None:
            continue
        if not ready:
            factor.zero_()  # discard this call: the next one starts from zero factors again
        elif drifted and not defer_drift:  # kept in the compute dtype from now on
            state[f"basis_{dim}"] = new_bases[dim] if spec.stacked else new_bases[dim][0]
        else:
            as_rows(state[f"basis_{dim}"]).copy_(new_bases[dim])
    store_back(stored, factors)
    state["bases_ready"] = ready
    return decomposed, drifted, new_bases if ready else [None] * len(factors)


APPLY_CHUNK_ELEMENTS = 1 << 25
"""Elements of low-precision parameters widened to fp32 at once by :func:`apply_deltas` (128
MiB of fp32): bounds the temporary memory while keeping the kernel count per chunk, not per
parameter."""


def apply_deltas(
    params: list[torch.Tensor], deltas: list[torch.Tensor], group: dict[str, Any]
) -> None:
    """``W <- W + delta``, then decoupled decay ``W <- W - lr * wd * W`` on the new W.

    Parameters and deltas in fp32 (fp64 for fp64 parameters) take one ``foreach`` path; others
    (bf16 / fp16 parameters, or deltas that crossed the wire in bf16) are updated in fp32 and
    rounded to the parameter's dtype once, a chunk of parameters at a time
    (:func:`_apply_widened`).
    """
    decay = -group_lr(group) * group["weight_decay"]
    fast, slow = [], []
    for p, d in zip(params, deltas, strict=True):
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        (fast if p.dtype == d.dtype == work else slow).append((p, d))
    if fast:
        fast_params = [p for p, _ in fast]
        torch._foreach_add_(fast_params, [d for _, d in fast])
        if group["weight_decay"] > 0:
            torch._foreach_add_(fast_params, fast_params, alpha=decay)
    chunk: list[tuple[torch.Tensor, torch.Tensor]] = []
    size = 0
    for p, d in slow:
        same_kind = chunk and (p.dtype, p.device) == (chunk[0][0].dtype, chunk[0][0].device)
        if chunk and (not same_kind or size + p.numel() > APPLY_CHUNK_ELEMENTS):
            _apply_widened(chunk, decay if group["weight_decay"] > 0 else None)
            chunk, size = [], 0
        chunk.append((p, d))
        size += p.numel()
    if chunk:
        _apply_widened(chunk, decay if group["weight_decay"] > 0 else None)


def _apply_widened(pairs: list[tuple[torch.Tensor, torch.Tensor]], decay: float | None) -> None:
    """Update parameters of one dtype and device in fp32 (fp64 for fp64), rounding once.

    The parameters are concatenated and widened together, updated, and copied back with one
    ``_foreach_copy_``: a fixed number of kernels for the whole chunk. Elementwise the same
    arithmetic as widening each parameter on its own.
    """
    work = torch.float64 if pairs[0][0].dtype == torch.float64 else torch.float32
    weight = torch.cat([p.reshape(-1) for p, _ in pairs]).to(work)
    weight.add_(torch.cat([d.reshape(-1) for _, d in pairs]).to(work))
    if decay is not None:
        weight.add_(weight, alpha=decay)
    pieces = weight.split([p.numel() for p, _ in pairs])
    params = [p for p, _ in pairs]
    torch._foreach_copy_(params, [w.view(p.shape) for w, p in zip(pieces, params)])
