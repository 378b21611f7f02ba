"""Llama 3 shaped models for the planner: the parameters only (no forward pass is needed).

Names and shapes follow torchtitan's Llama 3 (``tok_embeddings``, ``layers.N.attention.wq``,
``layers.N.feed_forward.w1``, ``norm``, ``output``): bias-free linear layers stored
``(out_features, in_features)``, grouped-query attention, a SwiGLU MLP, RMSNorm weights and an
untied output layer. With ``num_experts`` set, the MLP is a mixture of experts whose weights are
stacks ``(num_experts, out, in)`` named ``layers.N.moe.experts.w1`` (plus a router), the layout
``stack_dims=1`` is meant for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes of a Llama 3 model."""

    dim: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Number of query heads."""
    n_kv_heads: int
    """Number of key / value heads (grouped-query attention)."""
    ffn_hidden: int
    """Hidden width of the SwiGLU MLP (of each expert, with ``num_experts``)."""
    vocab_size: int
    """Number of token embeddings and of output logits."""
    num_experts: int = 0
    """Experts per MoE layer; 0: a dense MLP."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads


class Attention(nn.Module):
    """Grouped-query attention projections."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.wq = nn.Linear(config.dim, q, bias=False)
        self.wk = nn.Linear(config.dim, kv, bias=False)
        self.wv = nn.Linear(config.dim, kv, bias=False)
        self.wo = nn.Linear(q, config.dim, bias=False)


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden, bias=False)


class GroupedExperts(nn.Module):
    """SwiGLU experts stored as stacks, one matrix per expert."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        e, d, h = config.num_experts, config.dim, config.ffn_hidden
        self.w1 = nn.Parameter(torch.empty(e, h, d))
        self.w2 = nn.Parameter(torch.empty(e, d, h))
        self.w3 = nn.Parameter(torch.empty(e, h, d))


class MoE(nn.Module):
    """A router and grouped experts."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.router = nn.Linear(config.dim, config.num_experts, bias=False)
        self.experts = GroupedExperts(config)


class TransformerBlock(nn.Module):
    """Attention and MLP (or MoE), each after an RMSNorm."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention = Attention(config)
        if config.num_experts:
            self.moe = MoE(config)
        else:
            self.feed_forward = FeedForward(config)
        self.attention_norm = nn.RMSNorm(config.dim)
        self.ffn_norm = nn.RMSNorm(config.dim)


class Llama(nn.Module):
    """Llama 3: token embeddings, blocks, a final RMSNorm and an untied output layer."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
