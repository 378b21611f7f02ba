"""A small MoE layer for the expert-stack tests: one dense layer, then experts stored as a stack.

The experts' weights are one ``(num_experts, D, D)`` parameter (``stack_dims=1``, as torchtitan's
grouped experts), or the same matrices as separate ``(D, D)`` parameters (plain SOAP: the
reference). Token ``t`` goes to expert ``t % num_experts``, so every expert gets its share of
every batch.

Well-conditioned, so trajectories can be compared (docs/algorithm.md): square D x D weights,
``TOKENS_PER_EXPERT`` >> D tokens per expert, and input columns scaled from 0.5 to 2.
"""

from __future__ import annotations

import torch

D = 6
TOKENS_PER_EXPERT = 32
OPTIONS = dict(lr=3e-2, precondition_frequency=2, weight_decay=0.01)


def initial_weights(num_experts: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dense weight and bias, and the experts' stacked weights (the same in every process)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "dense_weight": (torch.randn(D, D, generator=gen, dtype=torch.float64) / D**0.5).to(dtype),
        "dense_bias": (0.1 * torch.randn(D, generator=gen, dtype=torch.float64)).to(dtype),
        "experts": (torch.randn(num_experts, D, D, generator=gen, dtype=torch.float64) / D**0.5).to(
            dtype
        ),
    }


def batch(step: int, num_experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of ``step`` (``TOKENS_PER_EXPERT`` tokens per expert)."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = num_experts * TOKENS_PER_EXPERT
    spread = torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    x = torch.randn(tokens, D, generator=gen, dtype=torch.float64) * spread
    target = torch.randn(tokens, D, generator=gen, dtype=torch.float64)
    return x.to(dtype), target.to(dtype)


def loss_of(
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor,
    experts: torch.Tensor | list[torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """The layer's loss, with the experts as one stack or as a list of matrices."""
    hidden = torch.tanh(x @ dense_weight.T + dense_bias)
    num_experts = experts.shape[0] if isinstance(experts, torch.Tensor) else len(experts)
    routed = hidden.view(-1, num_experts, D).transpose(0, 1)  # (experts, tokens, D)
    if isinstance(experts, torch.Tensor):
        out = torch.einsum("etd,eod->eto", routed, experts)
    else:
        out = torch.stack([routed[e] @ w.T for e, w in enumerate(experts)])
    return (out.transpose(0, 1).reshape(-1, D) - target).square().mean()
