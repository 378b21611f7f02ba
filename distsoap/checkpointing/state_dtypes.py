"""The dtypes of a block's saved state, made those SOAP allocates for its parameter now.

torch's ``Optimizer.load_state_dict`` casts floating-point state to the parameter's dtype; SOAP
keeps its own (:class:`~distsoap.engine.storage.StorageDtypes`): fp64 throughout for fp64
parameters, else the optimizer's ``moment_dtype``, ``factor_dtype`` and ``basis_dtype`` (fp32 bases
for a block the drift guard moved, as its saved ``basis_fallbacks`` says). A checkpoint saved
with other dtypes (fp32 state loaded into fp64 parameters, or back; other storage dtypes) is
converted to these on load, so the next step does not mix dtypes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distsoap.optimizer import SOAP

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


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
        A new dict: moments, factors and bases in their storage dtypes, other
        entries (non-tensors, unknown keys) as saved. Tensors stay on their device; one already
        in its dtype is returned as is, not copied.
    """
    dtypes = optimizer.engine.storage_dtypes(param, saved)
    converted = {}
    for key, value in saved.items():
        name = key.split("@", 1)[0]
        if isinstance(value, torch.Tensor) and name in MOMENT_KEYS:
            value = value.to(dtypes.moments)
        elif isinstance(value, torch.Tensor) and name.startswith("factor_"):
            value = value.to(dtypes.factors)
        elif isinstance(value, torch.Tensor) and name.startswith("basis_"):
            value = value.to(dtypes.bases)
        converted[key] = value
    return converted
