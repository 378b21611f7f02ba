"""Bytes each rank sends per step: distsoap's strategies vs AdamW on DDP / FSDP2, same model.

Runs the demo GPT for a few steps on local gloo ranks (world 2 and 4) and reports, per rank
and averaged over ranks, the bytes sent in the last step:
- distsoap counts what its all-to-alls actually send (``optimizer.comm_stats``);
- DDP is counted with a comm hook that sees every gradient bucket it all-reduces, at the bytes a
  ring all-reduce sends per rank, ``2 (world - 1) / world`` of the bucket (the least any
  all-reduce algorithm sends; a tree sends more);
- FSDP2's own traffic (parameter all-gather in forward and again in backward, gradient
  reduce-scatter) is counted at the ring volume ``3 (world - 1) / world`` of the parameter bytes.
Mode "ddp" sends DDP's all-reduce (its model is DDP-wrapped) plus the update gather; the FSDP2
modes send FSDP2's traffic plus (lossless) distsoap's gradient pieces and update pieces.

At world 4 it also runs FSDP2 over tensor parallel on a (dp, tp) = (2, 2) mesh, on a stack of
MLP blocks (colwise up, rowwise down projection, torchtitan's layout): FSDP2's own traffic is
``3 (dp - 1) / dp`` of each rank's TP-local parameter bytes; tensor parallelism's activation
all-reduces are the same for both optimizers and not counted.

    python benchmarks/bench_comm.py [--worlds 2,4] [--out benchmarks/results/bench_comm.json]
"""

from __future__ import annotations

import torch
from common import base_parser, write_results
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from distsoap import SOAP
from distsoap.demo.model import GPT, GPTConfig
from distsoap.demo.parallel import wrap_model
from distsoap.testing.local_ranks import run_ranks

STEPS = 3
TP_WIDTH, TP_LAYERS = 256, 4


class MLPBlock(torch.nn.Module):
    """A transformer's feed-forward layer, ``d -> 4d -> d``, with its residual connection."""

    def __init__(self, width: int):
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + down(tanh(up(x)))``."""
        return x + self.down(torch.tanh(self.up(x)))


class MLPStack(torch.nn.Sequential):
    """``layers`` feed-forward blocks."""

    def __init__(self, width: int = TP_WIDTH, layers: int = TP_LAYERS):
        super().__init__(*(MLPBlock(width) for _ in range(layers)))


def measure_tp(rank: int, world: int, setup: str) -> dict:
    """Bytes this rank sends in one step of ``setup`` on FSDP2 x TP, mesh (dp, tp) = (2, 2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    dp = world // 2
    mesh = init_device_mesh("cpu", (dp, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = MLPStack()
    plan = {}
    for i in range(TP_LAYERS):
        plan[f"{i}.up"] = ColwiseParallel()
        plan[f"{i}.down"] = RowwiseParallel()
    parallelize_module(model, mesh["tp"], plan)
    for block in model:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    local_bytes = sum(p._local_tensor.numel() * p.element_size() for p in model.parameters())
    # FSDP2 all-gathers a TP rank's part over the dp ranks twice and reduce-scatters its
    # gradient: ring volume (dp - 1) times this rank's piece, three times
    sent = {"fsdp2_own": 3 * (dp - 1) * local_bytes}
    if setup.endswith("adamw"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = SOAP(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank // 2)  # the ranks of one dp coordinate: one batch
    for _ in range(STEPS):
        x = torch.randn(32, TP_WIDTH, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    if isinstance(opt, SOAP):
        sent.update(opt.comm_stats["last_step_bytes"])
    return sent


def _counting_hook(counter: dict, world: int):
    def hook(state, bucket):
        nbytes = bucket.buffer().numel() * bucket.buffer().element_size()
        counter["ddp_all_reduce"] = counter.get("ddp_all_reduce", 0) + int(
            2 * (world - 1) * nbytes / world
        )
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def measure(rank: int, world: int, setup: str) -> dict:
    """Bytes this rank sends in one step of ``setup`` (after warm-up steps)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    ddp_counter: dict[str, int] = {}
    forward = model
    if setup in ("ddp+adamw", "distsoap ddp"):
        forward = DistributedDataParallel(model)
        forward.register_comm_hook(None, _counting_hook(ddp_counter, world))
    fsdp_bytes = 0
    if "fsdp2" in setup:
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        fsdp_bytes = int(3 * (world - 1) * param_bytes / world)
        forward = wrap_model(model, "fsdp2", "soap", torch.device("cpu"))
    if setup.endswith("adamw"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = SOAP(model.parameters(), strategy=setup.split()[1])
    gen = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        ddp_counter.clear()
        x = torch.randint(0, 256, (4, 128), generator=gen)
        opt.zero_grad()
        forward(x, x)[1].backward()
        opt.step()
    sent = dict(ddp_counter)
    if fsdp_bytes:
        sent["fsdp2_own"] = fsdp_bytes
    if isinstance(opt, SOAP):
        sent.update(opt.comm_stats["last_step_bytes"])
    return sent


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], "bench_comm")
    p.add_argument("--worlds", default="2,4")
    args = p.parse_args()
    n_params = sum(p.numel() for p in GPT(GPTConfig()).parameters())
    print(f"demo GPT: {n_params / 1e6:.2f}M fp32 parameters = {n_params * 4 / 2**20:.2f} MiB")
    report = {}
    for world in (int(w) for w in args.worlds.split(",")):
        rows = {}
        setups = (
            "ddp+adamw",
            "distsoap zero2",
            "distsoap ddp",
            "fsdp2+adamw",
            "distsoap fsdp2",
            "distsoap fsdp2_local",
        )
        for setup in setups:
            rows[setup] = _row(run_ranks(measure, world, setup))
        ddp_base = rows["ddp+adamw"]["mean_bytes"]
        fsdp_base = rows["fsdp2+adamw"]["mean_bytes"]
        print(f"\nworld {world}: bytes sent per rank per step")
        print(
            f"{'setup':22s} {'mean':>12s} {'max':>12s} {'/ DDP+AdamW':>12s} {'/ FSDP2+AdamW':>14s}"
        )
        for setup, row in rows.items():
            row["ratio_to_ddp_adamw"] = row["mean_bytes"] / ddp_base
            row["ratio_to_fsdp2_adamw"] = row["mean_bytes"] / fsdp_base
            print(
                f"{setup:22s} {row['mean_bytes']:12,.0f} {row['max_bytes']:12,.0f} "
                f"{row['ratio_to_ddp_adamw']:11.4f}x {row['ratio_to_fsdp2_adamw']:13.4f}x"
            )
        report[world] = rows
        if world == 4:
            report["4 (dp 2 x tp 2)"] = _tp_rows(world)
    write_results(args.out, report)


def _row(per_rank: list[dict]) -> dict:
    """Mean and max over ranks of the bytes sent, and rank 0's bytes by kind."""
    totals = [sum(r.values()) for r in per_rank]
    return {
        "mean_bytes": sum(totals) / len(totals),
        "max_bytes": max(totals),
        "by_kind_rank0": per_rank[0],
    }


def _tp_rows(world: int) -> dict:
    """FSDP2 x TP: AdamW and lossless distsoap, bytes per rank per step."""
    rows = {}
    for setup in ("fsdp2xtp+adamw", "distsoap fsdp2 (x tp)"):
        rows[setup] = _row(run_ranks(measure_tp, world, setup))
    base = rows["fsdp2xtp+adamw"]["mean_bytes"]
    print(f"\nworld {world}, FSDP2 x TP on (dp, tp) = (2, 2): bytes sent per rank per step")
    print(f"{'setup':22s} {'mean':>12s} {'max':>12s} {'/ FSDP2xTP+AdamW':>17s}")
    for setup, row in rows.items():
        row["ratio_to_fsdp2_tp_adamw"] = row["mean_bytes"] / base
        print(
            f"{setup:22s} {row['mean_bytes']:12,.0f} {row['max_bytes']:12,.0f} "
            f"{row['ratio_to_fsdp2_tp_adamw']:16.4f}x"
        )
    return rows


if __name__ == "__main__":
    main()
