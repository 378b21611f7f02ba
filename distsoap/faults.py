"""Numerical faults: non-finite gradients and failed eigendecompositions, contained per block.

- A block whose gradient holds a NaN or Inf is skipped for the step: no update, no weight decay,
  moments and factors untouched, its step count unchanged. Its ``nonfinite_skips`` state
  counter grows and a warning is logged (at most one per ``WARN_INTERVAL_S`` seconds, with the
  number of skips since the last one). With ``nonfinite_grads="raise"`` it is an error instead.
- A block whose eigenbasis cannot be computed after every retry keeps its previous basis; its
  ``basis_failures`` state counter counts consecutive failures, and reaching
  ``max_basis_failures`` is an error naming the parameter.

Errors are not raised mid-step: the step finishes its collectives first and every rank then
raises (distributed strategies carry an abort flag in their update exchange), so a fault on one
rank never leaves the others waiting.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

logger = logging.getLogger("distsoap")

NONFINITE_POLICIES = ("skip", "raise")
WARN_INTERVAL_S = 60.0


class NumericalFaultError(RuntimeError):
    """SOAP cannot continue: a non-finite gradient (raise mode) or repeated basis failures."""


class FaultPolicy:
    """Per-optimizer bookkeeping of numerical faults (see the module docstring).

    Args:
        nonfinite_grads: ``"skip"`` or ``"raise"``.
        max_basis_failures: consecutive eigenbasis failures of one block that end training.
    """

    def __init__(self, nonfinite_grads: str, max_basis_failures: int):
        if nonfinite_grads not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_grads must be one of {NONFINITE_POLICIES}, got {nonfinite_grads!r}"
            )
        valid = isinstance(max_basis_failures, int) and not isinstance(max_basis_failures, bool)
        if not valid or max_basis_failures < 1:
            raise ValueError(
                f"max_basis_failures must be an integer >= 1, got {max_basis_failures!r}"
            )
        self.nonfinite_grads = nonfinite_grads
        self.max_basis_failures = max_basis_failures
        self.pending: str | None = None
        self._last_warning = -float("inf")
        self._unreported = 0

    @staticmethod
    def finite(grads: dict[int, torch.Tensor]) -> dict[int, bool]:
        """Whether each gradient is free of NaN and Inf.

        One fused 2-norm over all gradients of a device and dtype (``torch._foreach_norm``: a
        few kernel launches, not one per tensor) and one device sync per device. A sum of
        squares propagates NaN and Inf, so a finite norm proves a finite gradient; a non-finite
        norm (a fault, or an overflow of the squares, whichever the backend does) is confirmed
        element by element on that gradient alone, so the answer is exact.
        """
        if not grads:
            return {}
        tensors = list(grads.values())
        by_device: dict[torch.device, dict[torch.dtype, list[int]]] = {}
        for i, g in enumerate(tensors):
            by_device.setdefault(g.device, {}).setdefault(g.dtype, []).append(i)
        values = [True] * len(tensors)
        for by_dtype in by_device.values():
            order = [i for indices in by_dtype.values() for i in indices]
            norms = [
                torch.stack(torch._foreach_norm([tensors[i] for i in indices], 2)).isfinite()
                for indices in by_dtype.values()
            ]
            for i, ok in zip(order, torch.cat(norms).tolist()):
                values[i] = ok or bool(torch.isfinite(tensors[i]).all())
        return dict(zip(grads.keys(), values))

    def nonfinite(self, name: str, state: dict[str, Any]) -> None:
        """Record a skipped block (or the error to raise at the end of the step)."""
        state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
        if self.nonfinite_grads == "raise":
            self.pending = self.pending or (
                f"non-finite gradient (NaN or Inf) for parameter {name}; "
                "nonfinite_grads='raise' (use 'skip' to skip such blocks for a step)"
            )
            return
        self._unreported += 1
        now = time.monotonic()
        if now - self._last_warning >= WARN_INTERVAL_S:
            logger.warning(
                "SOAP skipped %d block update(s) with non-finite gradients (latest: %s); "
                "their moments and factors are unchanged",
                self._unreported,
                name,
            )
            self._last_warning = now
            self._unreported = 0

    def basis(self, name: str, state: dict[str, Any], failed: bool) -> None:
        """Count a block's consecutive eigenbasis failures; reset them on success."""
        state["basis_failures"] = state.get("basis_failures", 0) + 1 if failed else 0
        if failed:
            logger.warning("SOAP kept the previous eigenbasis of %s (decomposition failed)", name)
        if state["basis_failures"] >= self.max_basis_failures:
            self.pending = self.pending or (
                f"the eigenbasis of parameter {name} failed {state['basis_failures']} times in "
                f"a row (max_basis_failures={self.max_basis_failures}): its factors are likely "
                "corrupt (non-finite or overflowed)"
            )

    def basis_fallback(self, name: str, state: dict[str, Any]) -> None:
        """Count a block whose low-precision bases the drift guard moved to fp32."""
        state["basis_fallbacks"] = state.get("basis_fallbacks", 0) + 1
        logger.warning(
            "SOAP keeps the eigenbases of %s in fp32 from now on: stored in basis_dtype they "
            "would lose more orthogonality than basis_orthogonality_tol allows",
            name,
        )

    def take_pending(self) -> str | None:
        """The error collected during this step, if any (cleared)."""
        message, self.pending = self.pending, None
        return message


def parameter_names(param_groups: list[dict[str, Any]]) -> dict[int, str]:
    """Map ``id(param)`` to a name for messages.

    The name comes from ``param_names`` when torch recorded them (``named_parameters()`` given
    to the optimizer), else it is ``param_groups[g]['params'][i]`` with the shape.
    """
    names = {}
    for g, group in enumerate(param_groups):
        given = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if given is not None and i < len(given):
                names[id(p)] = repr(given[i])
            else:
                names[id(p)] = f"param_groups[{g}]['params'][{i}] of shape {tuple(p.shape)}"
    return names
