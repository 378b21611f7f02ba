"""DeepSpeed: ``"type": "SOAP"`` in a DeepSpeed JSON config, ZeRO stages 0 to 3.

Two entry points, one mechanism:

- ``distsoap.integrations.deepspeed.initialize(...)``: the signature and return value of
  ``deepspeed.initialize``;
- plain ``deepspeed.initialize`` (what HF Trainer and Accelerate call) after
  ``import distsoap.integrations.deepspeed`` (or :func:`register`).

Registering does three things, each undone by nothing and safe to repeat:

1. ``torch.optim.SOAP`` names :class:`distsoap.SOAP`: DeepSpeed resolves a JSON optimizer "type"
   that is not one of its own as an attribute of ``torch.optim``.
2. SOAP joins DeepSpeed's list of ZeRO-supported optimizers, so configs need no
   ``"zero_allow_untested_optimizer": true``.
3. ``DeepSpeedEngine._configure_optimizer`` is wrapped: while it builds its optimizer wrappers,
   SOAP's ``step()`` does nothing (DeepSpeed's fp16 wrapper runs one all-zero-gradient step to
   allocate state); afterwards :func:`bind` gives SOAP the strategy for what DeepSpeed built:

   ====================================  =================================================
   DeepSpeed's optimizer                 distsoap strategy
   ====================================  =================================================
   SOAP itself (stage 0, fp32)           ``ddp``: DeepSpeed all-reduces the gradients
   FP16_UnfusedOptimizer (stage 0,       ``ddp`` on DeepSpeed's fp32 master copies
   bf16 / fp16)
   DeepSpeedZeroOptimizer (stage 1, 2),  :class:`~distsoap.strategies.deepspeed_zero.
   BF16_Optimizer, ZeRO-3                DeepSpeedPartitions` (lossless, whole matrices)
   ====================================  =================================================
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from distsoap.checkpointing.consolidate import gather_block_states
from distsoap.optimizer import SOAP, WRAPPER_BUILDING
from distsoap.strategies import make_strategy
from distsoap.strategies.deepspeed_zero import DeepSpeedPartitions

_WRAPPED_MARK = "_distsoap_wrapped"
_REPLICATING_MARK = "_distsoap_replicates_state"


def register() -> None:
    """Make ``"type": "SOAP"`` resolve and SOAP run under every ZeRO stage (idempotent)."""
    from deepspeed.runtime import engine as engine_module
    from deepspeed.runtime.zero import utils as zero_utils

    torch.optim.SOAP = SOAP
    if SOAP not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(SOAP)
    engine_class = engine_module.DeepSpeedEngine
    original = engine_class._configure_optimizer
    if getattr(original, _WRAPPED_MARK, False):
        return

    @functools.wraps(original)
    def configure_optimizer(engine, *args: Any, **kwargs: Any) -> None:
        token = WRAPPER_BUILDING.set(True)
        try:
            original(engine, *args, **kwargs)
        finally:
            WRAPPER_BUILDING.reset(token)
        if isinstance(engine.basic_optimizer, SOAP):
            bind(engine)

    setattr(configure_optimizer, _WRAPPED_MARK, True)
    engine_class._configure_optimizer = configure_optimizer


def initialize(*args: Any, **kwargs: Any):
    """``deepspeed.initialize`` with SOAP registered; same arguments, same return value.

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)``, as DeepSpeed's.
    """
    import deepspeed

    register()
    return deepspeed.initialize(*args, **kwargs)


def data_parallel_group(engine: Any) -> dist.ProcessGroup | None:
    """The process group DeepSpeed averages gradients over."""
    wrapper = engine.optimizer
    group = getattr(wrapper, "dp_process_group", None)
    return group if group is not None else engine.seq_data_parallel_group


def bind(engine: Any) -> None:
    """Give the engine's SOAP the strategy for DeepSpeed's optimizer wrapper (table above).

    Raises:
        ValueError: for what distsoap does not support under DeepSpeed (MoE layers, optimizer
            offload, pipeline or tensor parallelism).
    """
    soap: SOAP = engine.basic_optimizer
    wrapper = engine.optimizer
    if getattr(engine, "has_moe_layers", False):
        raise ValueError("distsoap does not support DeepSpeed MoE layers yet")
    if engine.zero_optimization() and engine.zero_cpu_offload():
        raise ValueError(
            "distsoap does not support ZeRO optimizer offload: SOAP's eigenbasis work needs "
            "the accelerator; remove zero_optimization.offload_optimizer"
        )
    if engine.mpu is not None and engine.mpu.get_model_parallel_world_size() > 1:
        raise ValueError("distsoap does not support DeepSpeed tensor / pipeline parallelism yet")
    group = data_parallel_group(engine)
    options = soap.strategy_options
    if wrapper is soap or _holds_master_copies(wrapper):
        # stage 0: the parameters SOAP steps have their shapes (the model's, or DeepSpeed's fp32
        # master copies of them); DeepSpeed has averaged the gradients: data-parallel mode A
        soap.parameters_replaced()
        name = "ddp" if dist.get_world_size(group) > 1 else "single"
        soap.set_strategy(make_strategy(soap.engine, name, group, **options))
        if name == "ddp" and not getattr(soap, _REPLICATING_MARK, False):
            # DeepSpeed writes stage 0's optimizer state from rank 0 alone, and every rank
            # loads that file: put every owner's blocks into the state dict of every rank
            soap.register_state_dict_post_hook(functools.partial(_replicate_state, group=group))
            setattr(soap, _REPLICATING_MARK, True)
        return
    name = f"deepspeed_zero{engine.zero_optimization_stage()}"
    partitions = DeepSpeedPartitions(
        soap.engine, soap.built_params, wrapper, group, options["comm_dtype"], name
    )
    soap.set_strategy(partitions)


def _replicate_state(
    optimizer: SOAP, state_dict: dict[str, Any], group: dist.ProcessGroup | None
) -> dict[str, Any]:
    """State-dict post-hook (stage 0): every owner's blocks, on every rank (collective).

    Loading keeps only the blocks each rank owns
    (:func:`distsoap.checkpointing.state_dict.load_state`).
    """
    return {**state_dict, "state": gather_block_states(state_dict["state"], group, to=None)}


def _holds_master_copies(wrapper: Any) -> bool:
    """Whether DeepSpeed's wrapper steps per-parameter fp32 copies (stage 0, bf16 / fp16)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return isinstance(wrapper, FP16_UnfusedOptimizer)


register()
