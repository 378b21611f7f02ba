"""SOAP's state in checkpoints: complete, unique to its owner, and checked when loaded.

``optimizer.state_dict()`` (and so ``torch.distributed.checkpoint``'s ``get_state_dict``) holds,
on each rank, the full state of the blocks that rank owns, and an empty entry for the others.
Saved with ``dcp.save`` the keys (parameter name + state key) are therefore unique to one rank,
never plain tensors that differ between ranks (which DCP would collapse), and the checkpoint
does not depend on who owned what: on load, each rank of the new world asks for the blocks it
owns under the new placement. Two details make that hold:

- every block a rank owns appears with every state key, even one that has not had a gradient
  yet (a zero state is written), so a loader that initialised the block (DCP does, with a
  zero-gradient step) always finds its keys;
- local-shard state (``strategy="fsdp2_local"``) depends on the shard, so its keys carry the
  rank (``exp_avg@rank1``): it loads only at the same world size.

Loading checks the layout hyperparameters (``max_precond_dim``, ``merge_dims``,
``precondition_1d``, ``stack_dims``, ``one_sided``, ``block_size``) against the optimizer's and
each block's saved layout against the one it expects, and raises ValueError naming the difference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from distsoap.checkpointing.consolidate import merge_consolidated
from distsoap.engine.blocks import BlockSpec, layout_signature
from distsoap.engine.update import new_block_tensors
from distsoap.hyperparams import resolved_shampoo_beta

if TYPE_CHECKING:
    from distsoap.optimizer import SOAP

# Hyperparameters that fix a parameter's state layout; a checkpoint must agree on them.
LAYOUT_KEYS = (
    "max_precond_dim",
    "merge_dims",
    "precondition_1d",
    "stack_dims",
    "one_sided",
    "block_size",
)


def new_state_header(group: dict[str, Any], spec: BlockSpec, offset: int) -> dict[str, Any]:
    """The non-tensor state of a block seen for the first time (``offset``: refresh phase)."""
    return {
        "refresh_offset": offset,
        "step": 0,
        "precondition_frequency": group["precondition_frequency"],
        "shampoo_beta": resolved_shampoo_beta(group),
        "block_layout": layout_signature(spec),
        "nonfinite_skips": 0,
        "basis_failures": 0,
        "basis_fallbacks": 0,
        "refresh_skips": 0,
        "skipped_refreshes": 0,
    }


def initial_state(optimizer: SOAP, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """The complete state of a block that has not had a usable gradient yet."""
    spec = optimizer.block_spec(param, group, optimizer.strategy.state_shape(param))
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    storage = optimizer.engine.storage_dtypes(param)
    state = new_state_header(group, spec, optimizer.engine.refresh_offset(param))
    state.update(new_block_tensors(spec, dtype, storage.moments, param.device, storage))
    state["bases_ready"] = False
    return state


def numbered_params(optimizer: SOAP):
    """(index in the packed state dict, param, group), as torch's state_dict numbers them."""
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            yield index, param, group
            index += 1


def complete_state_dict(optimizer: SOAP, state_dict: dict[str, Any]) -> dict[str, Any]:
    """State-dict post-hook: owned blocks complete, local-shard keys tagged with the rank."""
    packed = dict(state_dict["state"])
    for index, param, group in numbered_params(optimizer):
        if not param.requires_grad or not optimizer.strategy.owns(param):
            continue
        if "step" not in packed.get(index, {}):
            packed[index] = initial_state(optimizer, param, group)
        packed[index] = optimizer.strategy.export_state(param, packed[index], group)
    suffix = optimizer.strategy.state_key_suffix()
    if suffix:
        packed = {i: {f"{k}{suffix}": v for k, v in entry.items()} for i, entry in packed.items()}
    consolidated = getattr(optimizer, "_consolidated", None)
    if consolidated:
        packed = merge_consolidated(packed, consolidated)
    return {**state_dict, "state": packed}


def check_layout_hyperparameters(groups: list[dict], saved_groups: list[dict]) -> None:
    """Raise ValueError if a saved param group used other layout hyperparameters."""
    for index, (group, saved) in enumerate(zip(groups, saved_groups)):
        for key in LAYOUT_KEYS:
            if key in saved and saved[key] != group[key]:
                raise ValueError(
                    f"param group {index}: the checkpoint was saved with {key}={saved[key]!r} "
                    f"but this optimizer has {key}={group[key]!r}; it changes how SOAP's state "
                    "is laid out, so the saved state cannot be used"
                )


def load_state(optimizer: SOAP, state_dict: dict[str, Any]) -> None:
    """Put saved per-block state into ``optimizer.state`` (after torch loaded the groups).

    The state dict has passed :func:`distsoap.checkpointing.load_checks.find_problem`. Tensors are
    copied to the parameter's device in the dtypes SOAP computes in for it now (fp32 state of a
    parameter that became fp64 and back, moments saved with another ``moment_dtype``), and
    counters that older checkpoints lack get their starting values.
    """
    from distsoap.checkpointing.state_dtypes import convert_block_state

    saved_state = state_dict["state"]
    suffix = optimizer.strategy.state_key_suffix()
    # state keys are the saved groups' parameter ids (ints from state_dict(), names from
    # torch.distributed.checkpoint), matched to this optimizer's parameters by position
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    for (_, param, group), saved_id in zip(numbered_params(optimizer), saved_ids, strict=True):
        if saved_id not in saved_state or not optimizer.strategy.owns(param):
            continue  # a block owned elsewhere keeps its state there only
        saved = saved_state[saved_id]
        if suffix:
            saved = {k[: -len(suffix)]: v for k, v in saved.items() if k.endswith(suffix)}
        saved = optimizer.strategy.import_state(param, saved)
        if not saved:
            continue
        check_block_layout(optimizer, param, group, saved)
        spec = optimizer.block_spec(param, group, optimizer.strategy.state_shape(param))
        header = new_state_header(group, spec, optimizer.engine.refresh_offset(param))
        converted = convert_block_state(optimizer, param, saved)
        optimizer.state[param] = {
            **header,
            **{
                k: v.to(param.device, copy=True) if isinstance(v, torch.Tensor) else v
                for k, v in converted.items()
            },
        }


def check_block_layout(
    optimizer: SOAP, param: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]
) -> None:
    """Raise ValueError if a saved block's layout is not the one SOAP gives ``param`` now."""
    if "block_layout" not in saved:
        return
    shape = optimizer.strategy.state_shape(param)
    expected = layout_signature(optimizer.block_spec(param, group, shape))
    if saved["block_layout"] != expected:
        raise ValueError(
            f"the checkpoint's SOAP state for parameter {optimizer.param_name(param)} has "
            f"{saved['block_layout']}, but this optimizer lays it out as {expected} (from the "
            f"shape {shape} and max_precond_dim={group['max_precond_dim']}, merge_dims="
            f"{group['merge_dims']}, precondition_1d={group['precondition_1d']}, stack_dims="
            f"{group.get('stack_dims', 0)}, one_sided={group.get('one_sided', False)}, "
            f"block_size={group.get('block_size')}): the "
            "parameter's shape or one of these settings differs from the run that saved it"
        )


def _parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """Map ``id(param)`` to its name as torch.distributed.checkpoint names it.

    Wrapper prefixes (DDP, FSDP1, activation checkpointing, torch.compile) are removed.
    """
    names = {}
    for name, param in model.named_parameters():
        for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
            name = name.replace(wrapper, "")
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            name = name.removeprefix("module.")
        names[id(param)] = name
    return names


def optimizer_state_dict(model: torch.nn.Module, optimizer: SOAP) -> dict[str, Any]:
    """Return this rank's optimizer state keyed by parameter name, for ``dcp.save``/``load``.

    The same content as ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``
    gives for the other strategies; use it where that function cannot handle SOAP's state
    (FSDP1, whose ``FSDP.optim_state_dict`` expects state shaped like flat-parameter shards).
    A fresh optimizer's result is a valid ``dcp.load`` target: every block this rank owns is
    present with every key.
    """
    names = _parameter_names(model)
    packed = optimizer.state_dict()
    order = [names[id(p)] for _, p, _ in numbered_params(optimizer)]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in packed["param_groups"]]
    return {"state": {order[i]: v for i, v in packed["state"].items()}, "param_groups": groups}


def load_optimizer_state_dict(
    model: torch.nn.Module, optimizer: SOAP, state_dict: dict[str, Any]
) -> None:
    """Load a state dict made by :func:`optimizer_state_dict` (after ``dcp.load`` filled it)."""
    names = _parameter_names(model)
    index = {names[id(p)]: i for i, p, _ in numbered_params(optimizer)}
    groups = [
        {**g, "params": [index[name] for name in g["params"]]} for g in state_dict["param_groups"]
    ]
    state = {index[name]: v for name, v in state_dict["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})
