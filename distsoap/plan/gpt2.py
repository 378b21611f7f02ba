"""GPT-2 shaped models for the planner: the parameters only (no forward pass is needed).

Linear weights are stored ``(out_features, in_features)`` as ``nn.Linear`` (and nanoGPT) store
them; the Hugging Face checkpoint's ``Conv1D`` keeps the transpose, which has the same blocks.
The LM head is tied to the token embedding, as in GPT-2, so it is one parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class GPT2Config:
    """Shapes of a GPT-2 model."""

    vocab_size: int = 50257
    """Number of token embeddings (rows of the tied embedding / LM head)."""
    n_positions: int = 1024
    """Number of learned position embeddings."""
    dim: int = 768
    """Width of the residual stream."""
    n_layers: int = 12
    """Number of transformer blocks."""
    mlp_ratio: int = 4
    """Hidden width of the MLP over ``dim``."""


class GPT2Block(nn.Module):
    """Pre-norm attention and MLP with biases: LayerNorm, fused QKV, projections."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        d, hidden = config.dim, config.mlp_ratio * config.dim
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, hidden)
        self.mlp_proj = nn.Linear(hidden, d)


class GPT2(nn.Module):
    """GPT-2: token and position embeddings, blocks, a final LayerNorm, a tied LM head."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.n_positions, config.dim)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: named_parameters() lists it once
