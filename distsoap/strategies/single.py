"""Single process: every block is computed here, nothing is communicated."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch

from distsoap.comm import CommStats, raise_if_aborted
from distsoap.engine.update import apply_deltas

if TYPE_CHECKING:
    from distsoap.optimizer import SOAP


class SingleProcess:
    """Step every parameter that has a gradient, on this process."""

    name = "single"

    def __init__(self, optimizer: SOAP):
        self.optimizer = optimizer
        self.stats = CommStats()

    def step(self) -> None:
        """Compute and apply the update of every parameter with a gradient."""
        grads = {
            id(p): p.grad
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        }
        apply_updates(self.optimizer, self.optimizer.compute_updates(grads))
        self.stats.end_step()
        raise_if_aborted(self.optimizer.faults.take_pending(), set(), 0)

    def no_sync(self) -> AbstractContextManager:
        """Nothing to skip."""
        return nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over every parameter with a gradient."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def param_groups_changed(self) -> None:
        """Nothing is placed, so nothing to redo."""

    def state_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """The parameter's own shape."""
        return tuple(param.shape)

    def owns(self, param: torch.Tensor) -> bool:
        """Every block is here."""
        return True

    def state_key_suffix(self) -> str:
        """State does not depend on the rank."""
        return ""


def apply_updates(optimizer: SOAP, updates: dict, targets: dict | None = None) -> None:
    """Apply ``compute_updates``-style results, param group by param group, in group order.

    ``targets`` maps ``id(param)`` to the tensor to update instead of the parameter itself (a
    sharded parameter's local shard).
    """
    for group in optimizer.param_groups:
        params, deltas = [], []
        for p in group["params"]:
            entry = updates.get(id(p))
            if entry is not None and entry[1] is not None:
                params.append(p if targets is None else targets[id(p)])
                deltas.append(entry[1])
        if params:
            apply_deltas(params, deltas, group)


def groups_by_param(optimizer: SOAP) -> dict[int, dict]:
    """``id(param)`` -> the param group it belongs to now.

    Build it for each step: ``load_state_dict`` replaces the group dicts (and a scheduler changes
    their values), so a strategy must never keep group dicts of its own.
    """
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}
