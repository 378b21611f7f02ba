"""What each rank runs in the torchtitan test (importable by spawned processes).

torchtitan's own ``OptimizersContainer`` builds SOAP by name (``optimizer_name="SOAP"``) for the
FSDP2 x TP MLP of tests/distributed/tp_scenarios.py, and checkpoints go through the container's
FQN-keyed ``state_dict()`` / ``load_state_dict()`` (what torchtitan's CheckpointManager saves
with DCP). Each step's global batch is the two batches of tp_scenarios, split evenly over the
data-parallel ranks, so any (dp, tp) split trains on the same objective as the reference.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from tests.distributed.tp_scenarios import OPTIONS, batch, loss_of, make_model


def _build(mesh_shape: tuple[int, int], dtype: torch.dtype):
    """The MLP, tensor-parallel then fully sharded on ``(dp, tp)``, and torchtitan's container."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

    import distsoap.integrations.torchtitan  # noqa: F401  (registers "SOAP")

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp"))
    model = make_model(dtype)
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    config = OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern=r".*", optimizer_name="SOAP", optimizer_kwargs=OPTIONS)
        ]
    )
    return model, config.build(model_parts=[model])


def _train(model, container, steps: range, dp: int, dp_index: int, dtype) -> None:
    for step in steps:
        container.zero_grad()
        whole = torch.cat([batch(step, 0, dtype), batch(step, 1, dtype)])
        loss_of(model, whole.chunk(dp)[dp_index]).backward()
        container.step()


def _full(model) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def save_and_resume(
    rank: int,
    world: int,
    checkpoint: str,
    resume_meshes: list[tuple[int, int]],
    steps: int = 6,
    save_at: int = 3,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """Train on a (2, 2) mesh, saving at ``save_at``; resume on each of ``resume_meshes``."""
    model, container = _build((2, 2), dtype)
    initial = _full(model)
    container.state_dict()  # torchtitan's init_optim_state: a zero-gradient, lr=0 step
    untouched = all(torch.equal(a, b) for a, b in zip(_full(model), initial))
    soap = container.optimizers[0]
    no_bases = not any(s.get("bases_ready", False) for s in soap.state.values())
    dp, dp_index = 2, rank // 2
    _train(model, container, range(save_at), dp, dp_index, dtype)
    dcp.save(
        {"model": get_model_state_dict(model), "optimizer": container.state_dict()},
        checkpoint_id=checkpoint,
    )
    _train(model, container, range(save_at, steps), dp, dp_index, dtype)
    result = dict(
        uninterrupted=_full(model),
        init_step_untouched=untouched and no_bases,
        optimizer_type=type(soap).__name__,
        resumed=[],
    )
    for mesh_shape in resume_meshes:
        model, container = _build(mesh_shape, dtype)
        state = {"model": get_model_state_dict(model), "optimizer": container.state_dict()}
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(model, state["model"])
        container.load_state_dict(state["optimizer"])
        dp, tp = mesh_shape
        _train(model, container, range(save_at, steps), dp, rank // tp, dtype)
        result["resumed"].append(_full(model))
    return result
