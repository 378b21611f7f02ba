"""Step plans: which blocks a step computes, bucket by bucket, cached between steps.

Routing the parameters of a step into buckets (block layout, bucket key, row in the stacked
state) is pure bookkeeping that gives the same answer every step while the same parameters have
gradients. The optimizer builds a plan once for a set of stepped parameters and reuses it; each
step then does per bucket one stack of the gradients, the batched SOAP math and one split of the
deltas, with no per-parameter work beyond counting steps.

A plan is only cached for a step in which every block was already initialised and every gradient
finite, and it is keyed by the stepped parameters and every param group's identity and layout
hyperparameters, so a first call, a skipped block or a changed ``max_precond_dim`` goes through
the full routing (and its checks) again. Buckets rebuilt or reset (``load_state_dict``) make the
plans that used them stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from distsoap.engine.blocks import BlockSpec
from distsoap.engine.bucket import Bucket


@dataclass
class BucketStep:
    """One bucket's share of a step."""

    key: tuple
    """The bucket's key in the optimizer (group index, block shape, factored dims, dtype, ...)."""
    bucket: Bucket
    """The bucket holding the members' stacked state."""
    group: dict[str, Any]
    """The param group of every member (hyperparameters are read at each step)."""
    params: list[torch.Tensor]
    """The parameters stepped, in gradient-stack order."""
    states: list[dict[str, Any]]
    """Their state dicts (step counts are advanced there)."""
    rows: list[int]
    """Their rows in the bucket's stacked state, in order (a stacked member has several)."""
    specs: list[BlockSpec]
    """Their block layouts (all with the bucket's block shape)."""
    offsets: list[int]
    """Their refresh phases (0 for the aligned schedule)."""
    uniform: bool = field(init=False)
    """Every member has one parameter shape and no permutation: the gradients stack and the
    deltas split as one tensor each."""

    def __post_init__(self) -> None:
        first = self.specs[0]
        self.uniform = all(
            (s.param_shape, s.stacked) == (first.param_shape, first.stacked)
            and not s.channels_last
            and not s.blocked
            and not s.held_rows
            for s in self.specs
        )

    def row_counts(self) -> list[int]:
        """Per member, its number of rows (1, or its matrices when it is a stack)."""
        return [s.rows for s in self.specs]

    def per_row(self, values: list) -> list:
        """Per-member values repeated for each of the member's rows."""
        if all(s.rows == 1 for s in self.specs):
            return values
        return [v for v, s in zip(values, self.specs, strict=True) for _ in range(s.rows)]

    def stack_grads(self, grads: dict[int, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The members' gradients as one ``(rows, *block_shape)`` stack in ``dtype``."""
        if self.uniform:
            stacked = torch.stack([grads[id(p)] for p in self.params])
            return stacked.reshape(-1, *self.specs[0].block_shape).to(dtype)
        return torch.cat(
            [s.to_rows(grads[id(p)]).to(dtype) for s, p in zip(self.specs, self.params)]
        )

    def split_deltas(self, deltas: torch.Tensor) -> list[torch.Tensor]:
        """A ``(rows, *block_shape)`` stack of deltas as one tensor per member, parameter-shaped."""
        if self.uniform:
            return list(deltas.reshape(len(self.params), *self.specs[0].param_shape).unbind(0))
        pieces = deltas.split(self.row_counts())
        return [s.from_rows(d) for s, d in zip(self.specs, pieces)]
