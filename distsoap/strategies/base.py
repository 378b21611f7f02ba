"""The base every strategy derives from: what the optimizer asks of it, with defaults.

A strategy decides which blocks this rank computes and moves gradients to them and updates back;
the SOAP math itself is the :class:`~distsoap.engine.block_engine.BlockEngine`'s, which is all a
strategy knows of the optimizer. Defaults here fit a strategy that places nothing (every block on
this process, no hooks, no view of its own); the exchanges of the placing strategies end in one
shared path, :meth:`Strategy.apply_flagged`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from distsoap.checkpointing.stack_rows import has_rows, join_rows, split_rows
from distsoap.comm import CommStats, raise_if_aborted, read_flag
from distsoap.engine.block_engine import BlockEngine, Updates
from distsoap.engine.blocks import layout_signature
from distsoap.engine.update import apply_deltas


def groups_by_param(param_groups: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """``id(param)`` -> the param group it belongs to now.

    Build it for each step: ``load_state_dict`` replaces the group dicts (and a scheduler changes
    their values), so a strategy must never keep group dicts of its own.
    """
    return {id(p): group for group in param_groups for p in group["params"]}


def apply_updates(
    param_groups: list[dict[str, Any]], updates: Updates, targets: dict | None = None
) -> None:
    """Apply ``compute_updates``' results, param group by param group, in group order.

    ``targets`` maps ``id(param)`` to the tensor to update instead of the parameter itself (a
    sharded parameter's local shard).
    """
    for group in param_groups:
        params, deltas = [], []
        for p in group["params"]:
            entry = updates.get(id(p))
            if entry is not None and entry[1] is not None:
                params.append(p if targets is None else targets[id(p)])
                deltas.append(entry[1])
        if params:
            apply_deltas(params, deltas, group)


class Strategy:
    """Who computes which block, and how gradients get there and updates get back.

    Subclasses implement :meth:`step`; everything else has a default.

    Args:
        engine: the optimizer's block engine (its param groups, state and SOAP math).
        group: the process group this strategy communicates over (None: the world, or no
            communication at all). Every collective of the strategy uses it.
    """

    name = "base"
    views_model = False
    """Whether :meth:`model_view` shows SOAP other tensors than the optimizer's param groups."""

    def __init__(self, engine: BlockEngine, group: dist.ProcessGroup | None = None):
        self.engine = engine
        self.group = group
        self.stats = CommStats()
        self.rank = 0
        """This rank in ``group`` (0 when nothing is communicated)."""

    def step(self) -> None:
        """Update every parameter that has a gradient."""
        raise NotImplementedError

    def no_sync(self) -> AbstractContextManager:
        """Context for accumulation micro-batches: nothing to skip by default."""
        return nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over every parameter with a gradient."""
        params = [p for g in self.engine.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def param_groups_changed(self) -> None:
        """React to ``add_param_group`` after construction: nothing is placed by default."""

    def state_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """Shape of the tensor whose SOAP state this strategy keeps for ``param``."""
        return tuple(param.shape)

    agree_skips: Callable[[dict[int, bool]], set[int]] | None = None
    """Set by strategies that split parameters: see ``BlockEngine.agree_skips``."""

    def state_rows(self, param: torch.Tensor) -> tuple[int, ...] | None:
        """The blocks of ``param`` whose state this rank keeps, when only some (None: all)."""
        return None

    def owns(self, param: torch.Tensor) -> bool:
        """Whether this rank holds ``param``'s SOAP state (every block, by default)."""
        return True

    def state_key_suffix(self) -> str:
        """Appended to state keys in state dicts ('' unless the state depends on the rank)."""
        return ""

    def export_state(
        self, param: torch.Tensor, entry: dict[str, Any], group: dict[str, Any]
    ) -> dict[str, Any]:
        """A block's state as state dicts hold it: a stacked or blocked one, one key per row.

        Per-row keys (``exp_avg@stack5``, :mod:`distsoap.checkpointing.stack_rows`) are the
        same whichever rank holds which rows, so torch.distributed.checkpoint finds them under
        any placement (whole on one owner, split over several, any world size).
        """
        spec = self.engine.block_spec(param, group, self.state_shape(param))
        if not spec.stacked:
            return entry
        rows = spec.held_rows or tuple(range(spec.rows))
        return split_rows(entry, rows, layout_signature(spec.whole()))

    def import_state(self, param: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`export_state`: a saved entry as this rank keeps it.

        By default, an expert stack saved one matrix per key (by ranks that each held some of
        its experts, :mod:`distsoap.checkpointing.stack_rows`) is put back together whole.
        """
        return join_rows(saved) if has_rows(saved) else saved

    def model_view(self) -> AbstractContextManager:
        """Context in which the param groups hold the model's parameters (see SOAP)."""
        return nullcontext()

    def close(self) -> None:
        """Remove whatever the strategy attached to the model (hooks); nothing by default."""

    def end_step(self) -> None:
        """Close the byte counts of a training step."""
        self.stats.end_step()

    def finish(self, error: str | None, aborting: set[int]) -> None:
        """End the step, then raise ``error`` (this rank's fault), or name a rank that stopped."""
        self.end_step()
        raise_if_aborted(error, aborting, self.rank)

    def apply_flagged(
        self,
        received: Iterable[tuple[int, int, float, torch.Tensor]],
        params: list[torch.Tensor],
        target_of: Callable[[int], torch.Tensor],
        groups: dict[int, dict[str, Any]],
    ) -> set[int]:
        """Apply the received updates whose flag says they were computed, by param group.

        Args:
            received: per received block: its parameter's index, its owner rank, its flag
                (:func:`~distsoap.comm.update_flag`) and its piece (flat).
            params: the parameters, by index (their param group is looked up in ``groups``).
            target_of: the tensor to update for an index (the parameter or this rank's piece).
            groups: ``id(param)`` -> its param group now (:func:`groups_by_param`).

        Returns:
            The owners that flagged that training must stop after this step.
        """
        by_group: dict[int, tuple[dict[str, Any], list, list]] = {}
        aborting: set[int] = set()
        for index, owner, flag, piece in received:
            has_update, abort = read_flag(flag)
            if abort:
                aborting.add(owner)
            if not has_update or piece.numel() == 0:
                continue
            target = target_of(index)
            group = groups[id(params[index])]
            entry = by_group.setdefault(id(group), (group, [], []))
            entry[1].append(target)
            entry[2].append(piece.view(target.shape))
        for group, targets, deltas in by_group.values():
            apply_deltas(targets, deltas, group)
        return aborting

    def comm_device(self) -> torch.device:
        """Where this strategy's collectives run (the current CUDA device under NCCL)."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
