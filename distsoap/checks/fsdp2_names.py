"""Rank-independent names of FSDP2 parameters, for checking that every rank lists them alike.

A DTensor parameter carries no name, and under plain FSDP2 each rank holds different shards,
so neither a name nor a value can tell two same-shape parameters apart when one rank lists
them in another order (param groups built from a ``set``). The modules can: ``fully_shard``
records every module it manages in torch's composable-API registry, and the names a module's
``named_parameters()`` gives are the same on every rank of the same model. Each parameter is
named from the outermost managed module holding it (the root, when it is sharded too, as
torchtitan and FSDP2's documentation do).
"""

from __future__ import annotations

import torch
from torch import nn


def _managed_modules() -> list[nn.Module]:
    """The modules ``fully_shard`` manages, in the order they were sharded (empty if unknown)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # another torch layout: no names, the check falls back to values
        return []
    return [m for m in list(_module_state_mapping.keys()) if isinstance(m, FSDPModule)]


def fsdp2_parameter_names(params: list[torch.Tensor]) -> dict[int, str]:
    """``id(param)`` -> its name in the outermost FSDP2-managed module holding it.

    When the parameters lie in several outermost managed modules (the root was not sharded),
    each name is prefixed with that module's place among them (``"1:attn.weight"``), in the
    order ``fully_shard`` saw them, which is the same on every rank. Parameters no managed
    module holds are left out.
    """
    wanted = {id(p) for p in params}
    managed = _managed_modules()
    inner = {id(sub) for module in managed for sub in module.modules() if sub is not module}
    outermost = [m for m in managed if id(m) not in inner]
    holders = [m for m in outermost if any(id(p) in wanted for p in m.parameters())]
    names: dict[int, str] = {}
    for index, module in enumerate(holders):
        prefix = f"{index}:" if len(holders) > 1 else ""
        for name, param in module.named_parameters():
            if id(param) in wanted:
                names.setdefault(id(param), prefix + name)
    return names
