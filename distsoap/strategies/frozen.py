"""Parameters frozen when a placing strategy was built must stay frozen.

``ddp``, ``zero2``, ``fsdp2`` and ``fsdp1`` give every trainable parameter an owner rank (and
``zero2`` a gradient hook) at construction; a parameter that was frozen then has neither, so if
it becomes trainable later (``requires_grad_(True)``, gradual unfreezing) nothing would ever
update it, while single-process SOAP would. The check reads ``requires_grad``, which user code
sets alike on every rank, so every rank raises the same error at the same step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distsoap.engine.block_engine import BlockEngine


def frozen_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters among ``params`` that are not trainable now."""
    return [p for p in params if not p.requires_grad]


def check_still_frozen(engine: BlockEngine, frozen: list[torch.Tensor], strategy: str) -> None:
    """Raise ValueError if a parameter frozen at construction has become trainable.

    Args:
        engine: the optimizer's block engine (for the parameter's name).
        frozen: the parameters that were frozen when the placement was made.
        strategy: the strategy's name, for the message.
    """
    for p in frozen:
        if p.requires_grad:
            raise ValueError(
                f"parameter {engine.param_name(p)} became trainable (requires_grad=True) "
                f"after SOAP was built with strategy={strategy!r}, which places every "
                "parameter trainable at construction on an owner rank; this one would never be "
                "updated. Set requires_grad on every parameter you will train before building "
                "the optimizer (a parameter trainable then may be frozen and unfrozen later)."
            )
