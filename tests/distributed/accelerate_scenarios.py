"""HF Accelerate's FSDP2 optimizer checkpoints (what HF Trainer calls under FSDP2), on CPU ranks.

Accelerate enables FSDP only on GPUs, so these scenarios call its own save and load functions
(``accelerate.utils.fsdp_utils.save_fsdp_optimizer`` / ``load_fsdp_optimizer``, the ones the
Trainer's ``_save_optimizer_and_scheduler`` and ``_load_optimizer_and_scheduler`` call) on a
``fully_shard``-ed model over gloo, with an object standing in for the Accelerator (the two
members those functions use: Accelerate's ``PartialState``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from distsoap import SOAP
from tests.distributed.checkpoint_scenarios import CKPT_SHAPES
from tests.distributed.scenarios import OPTIONS, ProblemModel


def run(
    rank: int, world: int, state_dict_type: str, folder: str, save_at: int | None, stop: int
) -> list[torch.Tensor]:
    """Train to ``stop``; save at ``save_at`` (or, when None, load from ``folder`` first)."""
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import load_fsdp_optimizer, save_fsdp_optimizer

    ranks = PartialState(cpu=True)  # joins the process group run_ranks set up
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type)
    model = ProblemModel(torch.float64, CKPT_SHAPES, skips="none")
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = SOAP(model.param_groups(), **OPTIONS)
    start = 0
    if save_at is None:
        load_fsdp_optimizer(plugin, ranks, opt, model, folder)
        start = int(Path(folder, "step").read_text()) if rank == 0 else 0
        start_tensor = torch.tensor([start])
        dist.broadcast(start_tensor, 0)
        start = int(start_tensor)
        weights = torch.load(f"{folder}/weights_rank{rank}.pt", weights_only=True)
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.to_local().copy_(w)
    for step in range(start, stop):
        opt.zero_grad(set_to_none=True)
        model(step, rank, (rank, world)).backward()
        opt.step()
        if step + 1 == save_at:
            if state_dict_type == "FULL_STATE_DICT":
                opt.consolidate_state_dict()  # what SOAPCheckpointCallback does before a save
            save_fsdp_optimizer(plugin, ranks, opt, model, folder)
            torch.save(
                [p.to_local().clone() for p in model.parameters()],
                f"{folder}/weights_rank{rank}.pt",
            )
            if rank == 0:
                Path(folder, "step").write_text(str(save_at))
    return [p.full_tensor().detach().clone() for p in model.parameters()]
