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

    Args:
        params: the member parameters, in a fixed order (their row in every stack).
        states: their state dicts; tensors are moved into the stacks and replaced by views.
        keys: the state keys to stack.

    """

    def __init__(self, params: list[torch.Tensor], states: list[dict], keys: list[str]):
        self.params = params
        self.keys = keys
        self.row = {id(p): i for i, p in enumerate(params)}
        self.storage = {k: torch.stack([s[k] for s in states]) for k in keys}
        for i, state in enumerate(states):
            for k in keys:
                state[k] = self.storage[k][i]
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.params)

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
