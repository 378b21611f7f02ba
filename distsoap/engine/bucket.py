"""Buckets: same-shape blocks whose SOAP state lives in one stacked tensor per state key.

The optimizer's ``state[p]`` keeps the usual per-parameter dict, but once a block joins a bucket
its tensors are *views* into the bucket's stacked storage, so the batched math reads and writes
them with no copies. ``state[p]`` stays the single source of truth: a bucket can always be rebuilt
from it (after ``load_state_dict``, or when a new block joins).
"""

from __future__ import annotations

import torch

MAX_ROW_INDICES = 32
"""Row-index tensors a bucket keeps (a staggered schedule cycles through at most
``precondition_frequency`` subsets of rows; other subsets come from missing gradients)."""


def block_tensor_keys(factored: tuple[bool, ...]) -> list[str]:
    """State keys holding tensors for a block with the given factored dims."""
    keys = ["exp_avg", "exp_avg_sq"]
    for dim, has_factor in enumerate(factored):
        if has_factor:
            keys += [f"factor_{dim}", f"basis_{dim}"]
    return keys


class Bucket:
    """Stacked SOAP state for blocks of one shape, one dtype, one device and one param group.

    A member takes one row of every stack, or, when it is a stack of matrices itself
    (``stack_dims``), as many consecutive rows as it has matrices; its state tensors are then
    views of those rows.

    Args:
        params: the member parameters, in a fixed order (their rows in every stack).
        states: their state dicts; tensors are moved into the stacks and replaced by views.
        keys: the state keys to stack.
        counts: per member, its number of rows when it is a stack (state tensors led by that
            many rows), or None for a single block; default: every member a single block.

    """

    def __init__(
        self,
        params: list[torch.Tensor],
        states: list[dict],
        keys: list[str],
        counts: list[int | None] | None = None,
    ):
        self.params = params
        self.keys = keys
        counts = counts or [None] * len(params)
        self.row: dict[int, int] = {}
        """``id(param)`` -> its first row."""
        self.count: dict[int, int] = {}
        """``id(param)`` -> its number of rows."""
        self.owner_of_row: list[int] = []
        """Per row, the index in ``params`` of the member it belongs to."""
        for i, (p, n) in enumerate(zip(params, counts, strict=True)):
            self.row[id(p)] = len(self.owner_of_row)
            self.count[id(p)] = n or 1
            self.owner_of_row += [i] * (n or 1)
        self.storage = {
            k: torch.cat([s[k] if n else s[k].unsqueeze(0) for s, n in zip(states, counts)])
            for k in keys
        }
        for state, p, n in zip(states, params, counts):
            start = self.row[id(p)]
            for k in keys:
                state[k] = self.storage[k][start : start + n] if n else self.storage[k][start]
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self.padding: list[torch.Tensor | None] | None = None
        """Per block dim, every row's padding mask (blocked members), or None: no padding."""
        self.real_numels: torch.Tensor | None = None
        """Per row, its elements that are not padding, or None: no padding."""

    def padding_of(self, rows: list[int]) -> list[torch.Tensor | None] | None:
        """The padding masks of these rows (None when the bucket has none)."""
        if self.padding is None:
            return None
        if rows == list(range(len(self))):
            return self.padding
        index = self.row_index(rows)
        return [None if m is None else m.index_select(0, index) for m in self.padding]

    def real_numels_of(self, rows: list[int]) -> torch.Tensor | None:
        """The real (not padding) element counts of these rows (None: no padding)."""
        if self.real_numels is None or rows == list(range(len(self))):
            return self.real_numels
        return self.real_numels.index_select(0, self.row_index(rows))

    def __len__(self) -> int:
        return len(self.owner_of_row)

    def rows_of(self, param: torch.Tensor) -> range:
        """The rows of a member."""
        start = self.row[id(param)]
        return range(start, start + self.count[id(param)])

    def holds(self, params: list[torch.Tensor]) -> bool:
        """Whether every one of ``params`` is a member."""
        return all(id(p) in self.row for p in params)

    def select(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The stacked tensors for these rows.

        The storage itself when all rows are asked for in order, else copies that
        :meth:`write_back` returns to the storage.
        """
        if rows == list(range(len(self))):
            return dict(self.storage)
        index = self.row_index(rows)
        return {k: v.index_select(0, index) for k, v in self.storage.items()}

    def row_index(self, rows: list[int]) -> torch.Tensor:
        """``rows`` as an index tensor on the storage's device, kept for the next time.

        Built from a host list only the first time a subset is seen: on a GPU that copy waits
        for the device's queued work, and a staggered schedule asks for the same few subsets
        every cycle.
        """
        key = tuple(rows)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) >= MAX_ROW_INDICES:  # drop the oldest
                del self._indices[next(iter(self._indices))]
            device = next(iter(self.storage.values())).device
            index = self._indices[key] = torch.tensor(rows, device=device)
        return index

    def write_back(self, rows: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Store tensors obtained from :meth:`select` (a no-op when they are the storage)."""
        for k, v in tensors.items():
            target = self.storage[k]
            if v is target:
                continue
            if v.shape == target.shape and rows == list(range(len(self))):
                target.copy_(v)
            else:
                target.index_copy_(0, self.row_index(rows), v)
