"""Checks a state dict passes before ``SOAP.load_state_dict`` changes anything.

A state dict is refused (ValueError, the optimizer left as it was and still able to step) when
it is not SOAP's (torch AdamW's, the public reference's: other keys), when keys or param
groups are missing, when its hyperparameters are out of range or lay the state out otherwise,
and when it holds SOAP state for some blocks but none for a block this rank owns: loading it
would restart that block from empty state in silence. That last case is what a sharded run's
rank-0 ``state_dict()`` gives when it was saved without :meth:`SOAP.consolidate_state_dict`.

Under the distributed strategies the verdict is shared: every rank raises the same error
(``load_state_dict`` is collective there, as every framework calls it on every rank).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distsoap.checkpointing.state_dict import (
    check_block_layout,
    check_layout_hyperparameters,
    numbered_params,
)
from distsoap.engine.update import new_block_tensors
from distsoap.hyperparams import DEFAULTS, validate_group

if TYPE_CHECKING:
    from distsoap.optimizer import SOAP

REQUIRED_STATE_KEYS = ("step", "bases_ready", "precondition_frequency", "shampoo_beta")
"""Non-tensor keys every SOAP block state holds (the tensors depend on the block's layout)."""

CONSOLIDATE_HINT = (
    "a state dict written from one rank of a sharded run holds only that rank's blocks: call "
    "optimizer.consolidate_state_dict() on every rank before the save (HF Trainer: add "
    "distsoap.integrations.hf.SOAPCheckpointCallback; Lightning does it by itself), or save "
    "with torch.distributed.checkpoint (see the README's Checkpointing section)"
)


def find_problem(optimizer: SOAP, state_dict: Any) -> str | None:
    """What makes ``state_dict`` unusable for ``optimizer`` on this rank, or None."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        return "a state dict must be a dict with 'state' and 'param_groups'"
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
        return "'param_groups' must be a list and 'state' a dict"
    if len(saved_groups) != len(optimizer.param_groups):
        return (
            f"the state dict has {len(saved_groups)} param groups, this optimizer "
            f"{len(optimizer.param_groups)}"
        )
    for index, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        problem = _group_problem(optimizer, index, group, saved)
        if problem:
            return problem
    try:
        check_layout_hyperparameters(optimizer.param_groups, saved_groups)
    except ValueError as error:
        return str(error)
    if not all(isinstance(entry, dict) for entry in saved_state.values()):
        return "every entry of 'state' must be a dict (one parameter's state)"
    saved_ids = [i for g in saved_groups for i in g["params"]]
    suffix = optimizer.strategy.state_key_suffix()
    holds_state = any(_strip(entry, suffix) for entry in saved_state.values())
    missing = []
    for (_, param, group), saved_id in zip(numbered_params(optimizer), saved_ids):
        if not param.requires_grad or not optimizer.strategy.owns(param):
            continue
        entry = _strip(saved_state.get(saved_id) or {}, suffix)
        entry = optimizer.strategy.import_state(param, entry) if entry else entry
        if not entry:
            if holds_state:
                missing.append(optimizer.param_name(param))
            continue
        problem = _block_problem(optimizer, param, group, entry)
        if problem:
            return problem
    if missing:
        return (
            f"the state dict holds SOAP state, but none for {len(missing)} block(s) this rank "
            f"owns ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            + CONSOLIDATE_HINT
        )
    return None


def _strip(entry: dict[str, Any], suffix: str) -> dict[str, Any]:
    """A saved block state with this rank's key suffix removed (others' keys dropped)."""
    if not suffix:
        return entry
    return {k[: -len(suffix)]: v for k, v in entry.items() if k.endswith(suffix)}


def _group_problem(optimizer: SOAP, index: int, group: dict, saved: Any) -> str | None:
    if not isinstance(saved, dict) or "params" not in saved:
        return f"param group {index} of the state dict has no 'params'"
    if len(saved["params"]) != len(group["params"]):
        return (
            f"param group {index} of the state dict has {len(saved['params'])} parameters, "
            f"this optimizer's {len(group['params'])}"
        )
    absent = [key for key in DEFAULTS if key not in saved]
    if absent:
        return (
            f"param group {index} of the state dict lacks SOAP's hyperparameters {absent}: it "
            "was not saved by distsoap.SOAP (another optimizer's state cannot be loaded)"
        )
    try:
        validate_group({**group, **saved, "params": group["params"]}, optimizer.data_format)
    except ValueError as error:
        return f"param group {index} of the state dict: {error}"
    return None


def _block_problem(
    optimizer: SOAP, param: torch.Tensor, group: dict, entry: dict[str, Any]
) -> str | None:
    try:
        check_block_layout(optimizer, param, group, entry)
    except ValueError as error:
        return str(error)
    name = f"parameter {optimizer.param_name(param)}"
    spec = optimizer.block_spec(param, group, optimizer.strategy.state_shape(param))
    expected = new_block_tensors(spec, torch.float32, torch.float32, torch.device("meta"))
    absent = [k for k in (*REQUIRED_STATE_KEYS, *expected) if k not in entry]
    if absent:
        return (
            f"{name}: its saved state lacks {absent} (holds {sorted(entry)}): not a "
            "distsoap.SOAP state, or a partial one"
        )
    if isinstance(entry["step"], bool) or not isinstance(entry["step"], int):
        return f"{name}: its saved 'step' must be an int, got {type(entry['step']).__name__}"
    for key, like in expected.items():
        value = entry[key]
        if not isinstance(value, torch.Tensor) or value.shape != like.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"{name}: its saved {key!r} should have shape {tuple(like.shape)}, got {got}"
        if not value.is_floating_point():
            return f"{name}: its saved {key!r} has dtype {value.dtype}, not a floating-point one"
    return None


def agree(optimizer: SOAP, problem: str | None) -> str | None:
    """The first problem any rank found, the same text on every rank (collective if sharded)."""
    group = getattr(optimizer.strategy, "group", None)
    if optimizer.strategy.name == "single" or not dist.is_initialized():
        return problem
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, problem, group=group)
    found = [(rank, p) for rank, p in enumerate(gathered) if p]
    if not found:
        return None
    rank, text = found[0]
    others = f" (and {len(found) - 1} more rank(s))" if len(found) > 1 else ""
    return f"cannot load this optimizer state: rank {rank}{others}: {text}"
