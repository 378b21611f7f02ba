"""The dtypes of a block's saved state, made those SOAP allocates for its parameter now.

torch's ``Optimizer.load_state_dict`` casts floating-point state to the parameter's dtype; SOAP
keeps its own: factors and bases in the compute dtype (fp64 for fp64 parameters, else fp32),
``exp_avg`` / ``exp_avg_sq`` in the moment dtype (fp64 for fp64 parameters, else the
optimizer's ``moment_dtype``). A checkpoint saved with other dtypes (fp32 state loaded into fp64
parameters, or back; another ``moment_dtype``) is converted to these on load, so the next step
does not mix dtypes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distsoap.optimizer import SOAP

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
FACTOR_PREFIXES = ("factor_", "basis_")


def block_state_dtypes(optimizer: SOAP, param: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(moment dtype, factor and basis dtype) SOAP allocates for ``param``'s block."""
    if param.dtype == torch.float64:
        return torch.float64, torch.float64
    return optimizer.moment_dtype, torch.float32


def convert_block_state(optimizer: SOAP, param: torch.Tensor, saved: dict) -> dict:
    """``saved`` with every state tensor in the dtype SOAP would allocate for ``param`` now.

    Args:
        optimizer: the optimizer loading the state (its ``moment_dtype`` counts, not the one
            the checkpoint was saved with).
        param: the parameter the state belongs to (its dtype decides: fp64 or not).
        saved: one block's saved state: ``exp_avg``, ``exp_avg_sq``, ``factor_i``,
            ``basis_i`` and non-tensor entries (``step``, ``bases_ready``, ...). Keys may carry
            a rank suffix (``exp_avg@rank1``, local-shard state).

    Returns:
        A new dict: moments in the moment dtype, factors and bases in the compute dtype, other
        entries (non-tensors, unknown keys) as saved. Tensors stay on their device; one already
        in its dtype is returned as is, not copied.
    """
    moments, factors = block_state_dtypes(optimizer, param)
    converted = {}
    for key, value in saved.items():
        name = key.split("@", 1)[0]
        if isinstance(value, torch.Tensor) and name in MOMENT_KEYS:
            value = value.to(moments)
        elif isinstance(value, torch.Tensor) and name.startswith(FACTOR_PREFIXES):
            value = value.to(factors)
        converted[key] = value
    return converted
