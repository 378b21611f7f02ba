"""The demo under DeepSpeed (``--strategy deepspeed``): ZeRO-2 around SOAP or AdamW.

The optimizer and the learning-rate schedule are the demo's own objects, handed to
``distsoap.integrations.deepspeed.initialize``; DeepSpeed then averages and partitions the
gradients, clips them (``gradient_clipping``), steps the optimizer and the schedule in
``engine.step()``. SOAP runs lossless on DeepSpeed's partitions (strategy
``deepspeed_zero2``).
"""

from __future__ import annotations

from typing import Any

import torch

ZERO_STAGE = 2


def deepspeed_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    micro_batch: int,
    clip: float,
):
    """Return the DeepSpeed engine training ``model`` with ``optimizer`` and ``scheduler``."""
    from distsoap.integrations.deepspeed import initialize

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": ZERO_STAGE},
        "zero_allow_untested_optimizer": True,  # AdamW as a client optimizer object
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine
