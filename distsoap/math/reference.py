"""The readable SOAP: one parameter at a time, written line by line from docs/algorithm.md.

This is the definition of correct that :class:`distsoap.SOAP` is tested against. It makes no
attempt at speed: plain ``tensordot`` rotations, one parameter per loop iteration, and the
momentum rotated out and back in on every step exactly as the public reference does. It keeps
fp32 factors and bases (fp64 for fp64 parameters) and fp32 moments.

It follows the public reference in every respect, including where :class:`distsoap.SOAP`
deliberately differs (an all-zero first gradient: the reference freezes a basis computed from the
all-zero factor; distsoap waits for a non-zero gradient). Tests never feed that case to both.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain

import torch

from distsoap.engine.blocks import BlockSpec, make_block_spec
from distsoap.hyperparams import DEFAULTS, validate_group


def _contract(x: torch.Tensor, bases: list[torch.Tensor | None], out: bool) -> torch.Tensor:
    """Rotate along every dim of ``x``: ``Q^T`` along factored dims (in), ``Q`` when ``out``."""
    for basis in bases:
        if basis is None:
            x = x.permute(*range(1, x.dim()), 0)
        else:
            x = torch.tensordot(x, basis, dims=[[0], [1 if out else 0]])
    return x


class ReferenceSOAP(torch.optim.Optimizer):
    """Per-parameter SOAP, the readable reference. Same arguments and defaults as ``SOAP``."""

    def __init__(
        self,
        params,
        lr: float = DEFAULTS["lr"],
        betas: tuple[float, float] = DEFAULTS["betas"],
        shampoo_beta: float = DEFAULTS["shampoo_beta"],
        eps: float = DEFAULTS["eps"],
        weight_decay: float = DEFAULTS["weight_decay"],
        precondition_frequency: int = DEFAULTS["precondition_frequency"],
        max_precond_dim: int = DEFAULTS["max_precond_dim"],
        merge_dims: bool = DEFAULTS["merge_dims"],
        precondition_1d: bool = DEFAULTS["precondition_1d"],
        normalize_grads: bool = DEFAULTS["normalize_grads"],
        data_format: str = "channels_first",
        correct_bias: bool = DEFAULTS["correct_bias"],
        *,
        refresh_offset: Callable[[torch.Tensor], int] | None = None,
    ):
        """Take the same arguments as ``SOAP``, plus a schedule for tests.

        ``refresh_offset(param)`` gives a block's refresh phase: it refreshes when
        ``(t + phase) % precondition_frequency == 0`` (default 0, the reference's schedule).
        """
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
        )
        self.data_format = data_format
        self.refresh_offset = refresh_offset or (lambda param: 0)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its hyperparameters."""
        super().add_param_group(param_group)
        validate_group(self.param_groups[-1], self.data_format)

    def _spec(self, p: torch.Tensor, group: dict) -> BlockSpec:
        return make_block_spec(
            p.shape,
            max_precond_dim=group["max_precond_dim"],
            merge_dims=group["merge_dims"],
            precondition_1d=group["precondition_1d"],
            data_format=self.data_format,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one SOAP step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        spec = self._spec(p, group)
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        grad = spec.to_block(p.grad.to(dtype))
        state = self.state[p]
        if "bases" not in state:
            # First call: factors from this gradient, bases from eigh, no update.
            state["step"] = 0
            state["precondition_frequency"] = group["precondition_frequency"]
            sb = group["shampoo_beta"]
            state["shampoo_beta"] = sb if sb >= 0 else group["betas"][1]
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
            state["factors"] = [
                torch.zeros(d, d, dtype=dtype, device=grad.device) if f else None
                for d, f in zip(spec.block_shape, spec.factored, strict=True)
            ]
            self._update_factors(state, grad)
            state["bases"] = [self._eigh(f) if f is not None else None for f in state["factors"]]
            return

        beta1, beta2 = group["betas"]
        bases = state["bases"]
        grad_rot = _contract(grad, bases, out=False)  # 1. G' = in(G)
        state["step"] += 1  # 2.
        t = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad_rot, alpha=1 - beta1)  # 3.
        exp_avg_sq.mul_(beta2).add_(grad_rot.square(), alpha=1 - beta2)  # 4.
        direction = exp_avg / (exp_avg_sq.sqrt() + group["eps"])  # 5.
        step_size = group["lr"]  # 6.
        if group["correct_bias"]:
            step_size = step_size * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
        update = _contract(direction, bases, out=True)  # 7.
        if group["normalize_grads"]:
            update = update / (1e-30 + update.square().mean().sqrt())
        weight = p.to(dtype)
        weight.add_(spec.from_block(update), alpha=-step_size)  # 8.
        if group["weight_decay"] > 0:  # 9.
            weight.add_(weight, alpha=-group["lr"] * group["weight_decay"])
        p.copy_(weight)

        # 10. factors and bases with the raw gradient.
        exp_avg_orig = _contract(exp_avg, bases, out=True)  # a.
        self._update_factors(state, grad)  # b.
        if (t + self.refresh_offset(p)) % state["precondition_frequency"] == 0:  # c.
            self._refresh(state)
        state["exp_avg"] = _contract(exp_avg_orig, state["bases"], out=False)  # d.

    @staticmethod
    def _update_factors(state: dict, grad: torch.Tensor) -> None:
        for i, factor in enumerate(state["factors"]):
            if factor is None:
                continue
            others = [*chain(range(i), range(i + 1, grad.dim()))]
            outer = torch.tensordot(grad, grad, dims=[others, others])
            factor.lerp_(outer, 1 - state["shampoo_beta"])

    @staticmethod
    def _eigh(factor: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
        try:
            _, q = torch.linalg.eigh(factor + 1e-30 * eye)
        except torch.linalg.LinAlgError:
            _, q = torch.linalg.eigh(factor.double() + 1e-30 * eye.double())
            q = q.to(factor.dtype)
        return torch.flip(q, [1])

    @staticmethod
    def _refresh(state: dict) -> None:
        exp_avg_sq = state["exp_avg_sq"]
        new_bases: list[torch.Tensor | None] = []
        for i, (factor, basis) in enumerate(zip(state["factors"], state["bases"], strict=True)):
            if factor is None:
                new_bases.append(None)
                continue
            estimated = torch.diag(basis.T @ factor @ basis)
            order = torch.argsort(estimated, descending=True)
            exp_avg_sq = exp_avg_sq.index_select(i, order)
            basis = basis[:, order]
            q, _ = torch.linalg.qr(factor @ basis)
            new_bases.append(q)
        state["exp_avg_sq"] = exp_avg_sq
        state["bases"] = new_bases
