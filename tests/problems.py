"""Test problems whose SOAP factors are full rank from the first step (docs/algorithm.md).

Every parameter is scored directly in the loss as a linear map on its own i.i.d. inputs: the
parameter, flattened to (rows, rest), maps a fresh batch X (batch x rest) to X W^T, compared with
targets from a fixed random W*. The gradient R^T X is a sum of ``batch`` random rank-one terms,
so every unfolding of it is full rank when ``batch`` is well above every factored dim. Input
columns are scaled by a spread of values so the factors' eigenvalues are well separated.
1-D parameters are scored elementwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

BATCH_PER_DIM = 16  # batch >= 16x the largest dim, as docs/algorithm.md recommends


class RegressionProblem:
    """Independent least-squares losses, one per parameter, with per-step seeded data."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype=torch.float32, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = [tuple(s) for s in shapes]
        self.dtype = dtype
        self.seed = seed
        self.init = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.5 for s in shapes]
        self.targets = [w + _spread_matrix(s, gen) for w, s in zip(self.init, self.shapes)]
        self.col_scales = []
        for s in shapes:
            rest = _rest(s)
            self.col_scales.append(torch.linspace(0.5, 1.5, rest, dtype=torch.float64))

    def make_params(self, dtype=None) -> list[torch.nn.Parameter]:
        dtype = dtype or self.dtype
        return [torch.nn.Parameter(w.to(dtype).clone()) for w in self.init]

    def loss(
        self, params: Sequence[torch.Tensor], step: int, skip=(), shard: tuple[int, int] = (0, 1)
    ) -> torch.Tensor:
        """The summed loss at ``step``; parameters whose index is in ``skip`` are left out.

        ``shard=(k, n)`` scores only the k-th of n equal contiguous parts of every batch, as one
        data-parallel rank (or micro-batch) would; the mean of the n shard losses is the loss.
        """
        gen = torch.Generator().manual_seed(self.seed * 100_003 + step)
        total = 0.0
        for i, (p, target, scale) in enumerate(zip(params, self.targets, self.col_scales)):
            shape = self.shapes[i]
            rest = _rest(shape)
            batch = BATCH_PER_DIM * max(shape, default=1)
            x = torch.randn(batch, rest, generator=gen, dtype=torch.float64) * scale
            if i in skip:
                continue
            k, n = shard
            x = x[k * batch // n : (k + 1) * batch // n].to(p.dtype)
            if len(shape) <= 1:
                pred = x * p.reshape(1, -1)
                goal = x * target.to(p.dtype).reshape(1, -1)
            else:
                pred = x @ p.reshape(shape[0], -1).T
                goal = x @ target.to(p.dtype).reshape(shape[0], -1).T
            total = total + ((pred - goal) ** 2).mean()
        return total


def _spread_matrix(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random tensor whose (rows x rest) matricisation has singular values spread 2 to 0.5."""
    if len(shape) <= 1:
        n = shape[0] if shape else 1
        return torch.linspace(2.0, 0.5, n, dtype=torch.float64).reshape(shape)
    rows, rest = shape[0], _rest(shape)
    k = min(rows, rest)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(rest, k, generator=gen, dtype=torch.float64))
    return ((u * torch.linspace(2.0, 0.5, k, dtype=torch.float64)) @ v.T).reshape(shape)


def _rest(shape: tuple[int, ...]) -> int:
    if len(shape) <= 1:
        return max(shape[0] if shape else 1, 1)
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def train(
    problem: RegressionProblem,
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    steps: int,
    dtype=None,
    skip_schedule: Callable[[int], set[int]] | None = None,
) -> list[torch.Tensor]:
    """Run ``steps`` optimizer steps and return the final parameters (detached)."""
    params = problem.make_params(dtype)
    opt = make_optimizer(params)
    for step in range(steps):
        skip = skip_schedule(step) if skip_schedule else set()
        for p in params:
            p.grad = None
        problem.loss(params, step, skip).backward()
        opt.step()
    return [p.detach().clone() for p in params]


def relative_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """The largest per-parameter ``|a - b| / |b|``."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        diff = (x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)
        worst = max(worst, float(diff.detach()))
    return worst
