"""Expert stacks in checkpoints: one entry per matrix, so any split of the experts can load them.

A stack of matrices (``stack_dims``, MoE experts) whose experts are spread over ranks (expert
parallelism, or FSDP2 sharding the expert dim) is stepped where each expert lives, and each rank
keeps the state of its own experts only. Its state dict entry therefore names every matrix's
tensors by the matrix's global index in the stack (``exp_avg@stack5``, ``factor_0@stack5``):
keys unique to one expert, the same on ranks that hold a copy of it, so
``torch.distributed.checkpoint`` keeps every expert once, and a run with another split of the
experts (or a single process) finds each expert's state under the same keys.
"""

from __future__ import annotations

import re
from typing import Any

import torch

ROW_KEY = re.compile(r"^(?P<key>.+)@stack(?P<row>\d+)$")
"""A per-matrix state key: the block's key, then ``@stack`` and the matrix's global index."""


def split_rows(entry: dict[str, Any], rows: tuple[int, ...], full_layout: str) -> dict[str, Any]:
    """A stack's state with one key per matrix and tensor (see the module docstring).

    Args:
        entry: the state as this rank keeps it: tensors led by its matrices, in ``rows`` order.
        rows: the global index in the stack of each of this rank's matrices.
        full_layout: the layout signature of the whole stack (what every rank saves).
    """
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            for local, row in enumerate(rows):
                out[f"{key}@stack{row}"] = value[local]
        else:
            out[key] = value
    if "block_layout" in out:
        out["block_layout"] = full_layout
    return out


def has_rows(saved: dict[str, Any]) -> bool:
    """Whether a saved entry holds per-matrix keys (made by :func:`split_rows`)."""
    return any(ROW_KEY.match(k) for k in saved)


def join_rows(
    saved: dict[str, Any],
    rows: tuple[int, ...] | None = None,
    layouts: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The state of the matrices ``rows`` from a saved entry, as this rank keeps it.

    Per-matrix keys are stacked in ``rows`` order; whole-stack tensors (saved by a rank that
    held every matrix) are indexed by ``rows``. A tensor with a matrix missing is left out, so
    the load's checks name it.

    Args:
        saved: the saved entry.
        rows: the matrices this rank holds, by global index; None: every matrix the entry
            names, in order (a rank that steps the whole stack).
        layouts: the layout signatures of the whole stack and of this rank's part of it: a
            saved whole-stack layout becomes the local one (any other stays, for the load's
            layout check to refuse); None: keep the saved one.
    """
    by_key: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, Any] = {}
    for key, value in saved.items():
        match = ROW_KEY.match(key)
        if match:
            by_key.setdefault(match["key"], {})[int(match["row"])] = value
        else:
            out[key] = value
    for key, pieces in by_key.items():
        wanted = sorted(pieces) if rows is None else rows
        if all(r in pieces for r in wanted):
            out[key] = torch.stack([pieces[r] for r in wanted])
    whole = layouts is None or out.get("block_layout", layouts[0]) == layouts[0]
    if rows is not None and whole:
        for key, value in list(out.items()):
            tensor = key not in by_key and isinstance(value, torch.Tensor) and value.dim() > 0
            if tensor and value.shape[0] > max(rows, default=-1):  # a whole stack: ours of it
                out[key] = value[list(rows)]
    if layouts is not None and whole and "block_layout" in out:
        out["block_layout"] = layouts[1]
    return out
