"""What each rank runs in the expert-stack tests (importable by spawned processes).

The MoE layer of tests/expert_model.py with its experts as one ``(E, D, D)`` parameter in a
``stack_dims=1`` group. Under the DTensor strategies every parameter is distributed on a mesh
with the placements a scenario names, and every rank computes the same full-batch loss from
the full tensors, so each rank's gradient is its piece of the single-process gradient: what
differs from one process is only where SOAP's work happens.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from distsoap import SOAP
from tests.expert_model import OPTIONS, batch, initial_weights, loss_of

LAYOUTS = {
    # name: (mesh shape, expert placements, number of experts)
    "ep_on_two_mesh_dims": ((2, 2), ("Shard(0)", "Shard(0)"), 5),  # 2, 1, 1, 1 experts
    "hsdp_experts": ((2, 2), ("Replicate()", "Shard(0)"), 3),  # 2, 1 experts, twice
    "fsdp_experts_one_empty": ((4,), ("Shard(0)",), 3),  # 1, 1, 1, 0 experts
    "matrix_dim_cut": ((2,), ("Shard(1)",), 3),  # a matrix dim cut: owners, exchanged
}


class MoE(nn.Module):
    """The layer as a module (checkpoints name its parameters)."""

    def __init__(self, num_experts: int, dtype: torch.dtype, dense: bool = True):
        super().__init__()
        weights = initial_weights(num_experts, dtype)
        self.trainable_dense = dense
        for name in ("dense_weight", "dense_bias"):
            if dense:
                self.register_parameter(name, nn.Parameter(weights[name]))
            else:
                self.register_buffer(name, weights[name])
        self.experts = nn.Parameter(weights["experts"])

    def loss(self, step: int) -> torch.Tensor:
        """The full-batch loss of ``step``, from the full tensors."""
        full = [
            t.full_tensor() if hasattr(t, "full_tensor") else t
            for t in (self.dense_weight, self.dense_bias, self.experts)
        ]
        return loss_of(*full, *batch(step, self.experts.shape[0], self.experts.dtype))

    def param_groups(self) -> list[dict]:
        """Dense parameters in one group, the experts in a ``stack_dims=1`` group."""
        dense = [self.dense_weight, self.dense_bias] if self.trainable_dense else []
        groups = [{"params": dense}] if dense else []
        return groups + [{"params": [self.experts], "stack_dims": 1}]

    def full(self) -> list[torch.Tensor]:
        """Every trainable parameter, whole."""
        return [
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for p in self.parameters()
        ]


def reference(
    num_experts: int, dtype: torch.dtype, steps: int, dense: bool = True, **options
) -> list[torch.Tensor]:
    """Single-process plain SOAP with the experts as separate parameters."""
    weights = initial_weights(num_experts, dtype)
    dense_params = [nn.Parameter(weights["dense_weight"]), nn.Parameter(weights["dense_bias"])]
    experts = [nn.Parameter(w.clone()) for w in weights["experts"]]
    opt = SOAP((dense_params if dense else []) + experts, **OPTIONS, **options)
    for step in range(steps):
        opt.zero_grad()
        x, target = batch(step, num_experts, dtype)
        loss_of(*dense_params, experts, x, target).backward()
        opt.step()
    stacked = torch.stack([e.detach() for e in experts])
    return [p.detach() for p in dense_params] + [stacked] if dense else [stacked]


def one_process(num_experts: int, dtype: torch.dtype, steps: int) -> list[torch.Tensor]:
    """Single-process SOAP on the same stacked model (the same loss and gradients as the ranks)."""
    model = MoE(num_experts, dtype)
    opt = SOAP(model.param_groups(), strategy="single", **OPTIONS)
    _train(model, opt, range(steps))
    return model.full()


def _distribute(model: MoE, layout: str) -> None:
    """Make every parameter a DTensor on the layout's mesh (dense ones sharded on dim 0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    shape, expert_placements, _ = LAYOUTS[layout]
    mesh = init_device_mesh("cpu", shape)
    dense_placements = [Replicate()] * (len(shape) - 1) + [Shard(0)]
    for name, param in list(model.named_parameters()):
        placements = (
            [eval(p, {"Shard": Shard, "Replicate": Replicate}) for p in expert_placements]
            if name == "experts"
            else dense_placements
        )
        setattr(model, name, nn.Parameter(distribute_tensor(param.detach(), mesh, placements)))


def _train(model: MoE, opt, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        model.loss(step).backward()
        opt.step()


def train(
    rank: int,
    world: int,
    strategy: str,
    layout: str | None,
    steps: int,
    dtype,
    dense: bool = True,
    **options,
) -> dict:
    """Train ``steps`` steps; the full parameters, this rank's state and bytes sent."""
    num_experts = LAYOUTS[layout][2] if layout else 3
    model = MoE(num_experts, dtype, dense)
    if layout:
        _distribute(model, layout)
    opt = SOAP(model.param_groups(), strategy=strategy, **OPTIONS, **options)
    _train(model, opt, range(steps))
    state = opt.state[model.experts]
    return dict(
        full=model.full(),
        expert_rows=tuple(state["exp_avg"].shape[:1]) if "exp_avg" in state else None,
        bytes=opt.comm_stats["total_bytes"],
    )


def save_and_resume(
    rank: int, world: int, checkpoint: str, resume_layouts: list[str], steps: int = 6
) -> dict:
    """Train on ``ep_on_two_mesh_dims``, saving at step 3 with DCP; resume on other layouts."""
    dtype = torch.float64
    model = MoE(5, dtype)
    _distribute(model, "ep_on_two_mesh_dims")
    opt = SOAP(model.param_groups(), **OPTIONS)
    _train(model, opt, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    _train(model, opt, range(3, steps))
    result = {"uninterrupted": model.full(), "resumed": {}}
    for layout in resume_layouts:
        other = MoE(5, dtype)
        _distribute(other, layout)
        other_opt = SOAP(other.param_groups(), **OPTIONS)
        model_sd, optim_sd = get_state_dict(other, other_opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(
            other, other_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        _train(other, other_opt, range(3, steps))
        result["resumed"][layout] = other.full()
    return result


def nan_on_one_rank(rank: int, world: int, bad_rank: int) -> str:
    """Experts only; NaN in ``bad_rank``'s expert gradient at step 2, ``nonfinite_grads="raise"``.

    Returns the error each rank raised (every rank must raise, none may hang).
    """
    model = MoE(5, torch.float64, dense=False)
    _distribute(model, "ep_on_two_mesh_dims")
    opt = SOAP(model.param_groups(), nonfinite_grads="raise", **OPTIONS)
    for step in range(4):
        opt.zero_grad()
        model.loss(step).backward()
        if step == 2 and rank == bad_rank:
            model.experts.grad.to_local().fill_(float("nan"))
        try:
            opt.step()
        except RuntimeError as error:
            return f"step {step}: {error}"
    return "no error"
