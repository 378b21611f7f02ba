"""First-step check that ranks holding copies of a parameter hold the same one, in the same place.

The start-up fingerprint (:mod:`distsoap.checks.consistency`) hashes shapes, not identities: two
same-shape parameters listed in a different order on two ranks (param groups built by iterating
a ``set``) pass it, and every exchange then pairs a block on one rank with a different block on
another. Where ranks hold copies of the same tensor (``ddp`` and ``zero2``: every rank holds
every parameter; HSDP: the ranks holding the same shard in different replica groups), the copies
must agree, position by position, before the first update:

- values: always (DDP broadcasts rank 0's weights when it wraps the model; ``zero2`` and HSDP
  synchronise nothing, so unequal values also mean replicas initialised differently);
- gradients, where they are averaged before the optimizer sees them (``ddp``, HSDP).

Each rank reduces every parameter it holds a copy of to a few float64 numbers (sum and sum of
squares of its value and gradient); one all-reduce of their maxima and minima over the ranks
holding the same piece tells every rank the same thing. A step whose gradients are all zero or
absent on every rank (torch.distributed.checkpoint's state-initialising step, run by
``get_state_dict`` before a checkpoint is loaded, when values may still differ) does not count:
the check runs again on the next step, until one with a real gradient has been checked.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

VALUE_SUM, VALUE_SQUARES, GRAD_PRESENT, GRAD_SUM, GRAD_SQUARES = range(5)

RELATIVE_TOLERANCE = 1e-6
"""Copies are bitwise equal in a correct run (same tensors, same reduction kernels); the margin
only keeps the old ``ddp`` check's allowance for reductions that round differently."""

_SENTINEL = 1e300  # stands for NaN and Inf, equal on every rank that holds the same non-finite


def local_stats(values: list[torch.Tensor], grads: list[torch.Tensor | None]) -> torch.Tensor:
    """Per parameter: value sum and sum of squares, gradient presence, sum and sum of squares.

    Returns:
        A ``(len(values), 5)`` float64 tensor on the parameters' device.
    """
    f64 = torch.float64
    rows = []
    for value, grad in zip(values, grads):
        zero = torch.zeros((), dtype=f64, device=value.device)
        row = [value.sum(dtype=f64), torch.linalg.vector_norm(value, dtype=f64).square()]
        if grad is None:
            row += [zero, zero, zero]
        else:
            norm = torch.linalg.vector_norm(grad, dtype=f64).square()
            row += [zero + 1, grad.sum(dtype=f64), norm]
        rows.append(torch.stack(row))
    if not rows:
        return torch.zeros((0, 5), dtype=f64)
    stacked = torch.stack(rows)
    return torch.nan_to_num(stacked, nan=_SENTINEL, posinf=_SENTINEL, neginf=-_SENTINEL)


def spread(
    stats: torch.Tensor,
    slots: list[int],
    n_slots: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maxima and minima of ``stats`` over the ranks that share each parameter's slot.

    Args:
        stats: this rank's ``(P, 5)`` statistics.
        slots: per parameter, which copy this rank holds (0 when every rank holds the same).
        n_slots: the number of distinct copies of any parameter.
        group: the process group (every rank calls this).
        device: where the collective runs (CUDA for NCCL).

    Returns:
        ``(highest, lowest)``, both ``(P, n_slots, 5)`` on the CPU; a slot no rank holds is
        ``-inf`` in ``highest`` and ``inf`` in ``lowest``.
    """
    count = stats.shape[0]
    both = torch.full((2, count, n_slots, 5), -math.inf, dtype=torch.float64)
    rows = torch.arange(count)
    columns = torch.tensor(slots, dtype=torch.long)
    both[0, rows, columns] = stats.cpu()
    both[1, rows, columns] = -stats.cpu()
    both = both.to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    both = both.cpu()
    return both[0], -both[1]


def first_mismatch(
    highest: torch.Tensor, lowest: torch.Tensor, numels: list[int], columns: tuple[int, ...]
) -> int | None:
    """The first parameter whose copies differ in one of ``columns`` (None if none)."""
    held = highest[..., GRAD_PRESENT] >= lowest[..., GRAD_PRESENT]  # slots some rank holds
    n = torch.tensor(numels, dtype=torch.float64).clamp(min=1).view(-1, 1)
    bad = torch.zeros(held.shape, dtype=torch.bool)
    for total, squares in ((VALUE_SUM, VALUE_SQUARES), (GRAD_SUM, GRAD_SQUARES)):
        if total not in columns:
            continue
        scale = highest[..., squares].abs()
        # |sum| <= sqrt(n * sum of squares): the scale of a sum, even one that cancels to ~0
        bad |= (highest[..., total] - lowest[..., total]).abs() > RELATIVE_TOLERANCE * (
            (n * scale).sqrt()
        )
        bad |= (highest[..., squares] - lowest[..., squares]) > RELATIVE_TOLERANCE * scale
    if GRAD_PRESENT in columns:
        bad |= highest[..., GRAD_PRESENT] != lowest[..., GRAD_PRESENT]
    bad &= held
    rows = bad.any(dim=1).nonzero().flatten().tolist()
    return rows[0] if rows else None


def saw_real_gradient(highest: torch.Tensor) -> bool:
    """Whether some rank held a gradient that is not all zero."""
    return bool((highest[..., GRAD_SQUARES] > 0).any())


_REMEDY = {
    "ddp": "wrap the model in DistributedDataParallel before the first step (it broadcasts rank "
    "0's parameters)",
    "zero2": "seed every rank alike, or broadcast rank 0's parameters before training "
    "(strategy='zero2' never synchronises parameters)",
    "fsdp2": "initialise every HSDP replica alike (seed, or load a checkpoint); FSDP2 does not "
    "broadcast parameters",
}


def check_copies(
    strategy: str,
    names: list[str],
    values: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    slots: list[int],
    n_slots: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
    compare_grads: bool,
) -> bool:
    """Raise the same error on every rank if copies of a parameter differ (module docstring).

    Args:
        strategy: the strategy's name, for the message.
        names: per parameter, its name in messages.
        values: per parameter, the tensor this rank holds (whole, or its shard).
        grads: per parameter, this rank's gradient of that tensor (None: none).
        slots: see :func:`spread`.
        n_slots: see :func:`spread`.
        group: the process group; every rank calls this.
        device: where the collective runs.
        compare_grads: whether the gradients, too, must be equal.

    Returns:
        Whether the check counted: False when no rank had a gradient that is not all zero.

    Raises:
        ValueError: values of a parameter's copies differ (parameters in a different order on
            some rank, or replicas initialised differently).
        RuntimeError: (``ddp``) values agree but gradients differ: the model is not wrapped in
            DistributedDataParallel, or same-valued parameters are in a different order.
    """
    stats = local_stats(values, grads)
    highest, lowest = spread(stats, slots, n_slots, group, device)
    if not saw_real_gradient(highest):
        return False
    numels = [v.numel() for v in values]
    bad = first_mismatch(highest, lowest, numels, (VALUE_SUM, VALUE_SQUARES))
    if bad is not None:
        raise ValueError(
            f"parameter {names[bad]} holds different values on different ranks at the first "
            f"step (strategy={strategy!r}, where every copy must be equal). Either the ranks "
            "list same-shape parameters in different orders (param groups built from a set, or "
            "in a rank-dependent order: build them in one order, ideally from "
            "model.named_parameters(), which SOAP also compares at construction), or the "
            f"replicas were initialised differently: {_REMEDY.get(strategy, _REMEDY['fsdp2'])}."
        )
    if compare_grads:
        columns = (GRAD_PRESENT, GRAD_SUM, GRAD_SQUARES)
        bad = first_mismatch(highest, lowest, numels, columns)
        if bad is not None and strategy == "ddp":
            raise RuntimeError(
                "gradients differ across ranks, but strategy='ddp' expects them averaged by "
                "DistributedDataParallel: wrap the model in DDP, or pass strategy='zero2' to "
                "let distsoap synchronise the gradients itself (first differing: parameter "
                f"{names[bad]}; if the model is DDP-wrapped, the ranks list same-shape "
                "parameters in different orders: build the param groups in one order)"
            )
        if bad is not None:
            raise ValueError(
                f"the gradient of parameter {names[bad]} differs between ranks holding the same "
                f"shard (strategy={strategy!r}): the ranks list same-shape parameters in "
                "different orders; build the param groups in one order, ideally from "
                "model.named_parameters()"
            )
    return True
