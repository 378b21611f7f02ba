"""Per-rank optimizer-step time and SOAP state at world 1, 2 and 4 (local gloo ranks).

The parameter set is bench_step.py's GPT shape (CPU preset), with synthetic gradients:
- strategy "ddp": replicated parameters with gradients equal on every rank (as DDP leaves
  them): the owner's SOAP work plus the update all-gather;
- "fsdp2": parameters and gradients as DTensors sharded on dim 0 (what FSDP2 leaves after
  backward): gradient pieces to owners, whole-matrix SOAP, update pieces back;
- "fsdp2_local": the same DTensors, SOAP on each rank's local shards;
- "fsdp2_tp" (world 4 only): DTensors on a (dp, tp) = (2, 2) mesh, matrices sharded on both
  dims (``(Shard(0), Shard(1))``: FSDP2 over rowwise tensor parallel), vectors sharded on dp and
  replicated on tp; lossless SOAP over the whole mesh;
- "ddp_whole", "fsdp2_whole": "ddp" / "fsdp2" with ``split_blocks="never"``: every parameter on
  one owner even when ``--block-size`` cuts it into blocks (what they did before blocks got
  owners of their own): the comparison for "ddp" and "fsdp2" there.
``--block-size N`` passes ``block_size=N`` to SOAP; ``--vocab N`` replaces the preset's
vocabulary size (a large one makes the embedding outweigh a rank's share of the work).
Also printed: the load balance of the placement, max / mean over ranks of the modelled compute
and state bytes (1.0 is perfect).

On this 2-core machine world 4 runs four ranks on two cores, one thread each; step times there
show the work split and the exchange, not a speed-up.

    python benchmarks/bench_scaling.py [--worlds 1,2,4] [--steps 20]
"""

from __future__ import annotations

import itertools

import torch
from common import (
    GPT_PRESETS,
    base_parser,
    gpt_shapes,
    time_calls,
    write_results,
)

from distsoap import SOAP
from distsoap.placement import BlockCost, Piece, load_balance
from distsoap.testing.local_ranks import run_ranks


def measure(
    rank: int, world: int, strategy: str, steps: int, block_size: int | None, vocab: int | None
) -> dict:
    """Time ``steps`` optimizer steps after one refresh cycle of warm-up."""
    preset = dict(GPT_PRESETS["cpu"], **({"vocab": vocab} if vocab else {}))
    gen = torch.Generator().manual_seed(0)
    shapes = gpt_shapes(**preset)
    weights = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    if world == 1:
        strategy = "single"
    if strategy == "fsdp2_tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world // 2, 2))

        def place(t: torch.Tensor):
            return [Shard(0), Shard(1)] if t.dim() == 2 else [Shard(0), Replicate()]

        weights = [distribute_tensor(w, mesh, place(w)) for w in weights]
        grads = [[distribute_tensor(g, mesh, place(g)) for g in gs] for gs in grads]
        strategy = "fsdp2"
    elif strategy.startswith("fsdp2") and strategy != "fsdp2_whole":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        weights = [distribute_tensor(w, mesh, [Shard(0)]) for w in weights]
        grads = [[distribute_tensor(g, mesh, [Shard(0)]) for g in gs] for gs in grads]
    split_blocks = "auto"
    if strategy.endswith("_whole"):
        strategy = strategy.removesuffix("_whole")
        split_blocks = "never"
        if strategy == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = init_device_mesh("cpu", (world,))
            weights = [distribute_tensor(w, mesh, [Shard(0)]) for w in weights]
            grads = [[distribute_tensor(g, mesh, [Shard(0)]) for g in gs] for gs in grads]
    params = [torch.nn.Parameter(w) for w in weights]
    opt = SOAP(
        params,
        max_precond_dim=preset["max_precond_dim"],
        strategy=strategy,
        block_size=block_size,
        split_blocks=split_blocks,
    )
    if strategy == "ddp":
        opt.strategy._checked_replicas = True  # the grads are equal by construction

    counter = itertools.count()

    def step() -> None:
        for p, g in zip(params, grads[next(counter) % 3]):
            p.grad = g
        opt.step()

    seconds = time_calls(step, "cpu", warmup=11, repeats=1, number=steps).times[0]
    state = opt.state_bytes()
    balance = {}
    if strategy in ("ddp", "fsdp2"):
        balance = load_balance(*_piece_costs(opt.strategy), world)
    return {"seconds": seconds, "state_bytes": state, "balance": balance}


def _piece_costs(strategy) -> tuple[list[BlockCost], list[int]]:
    """Per piece (a whole parameter, or a split parameter's blocks on one owner): cost, owner."""
    pieces = getattr(strategy, "pieces", None)
    if pieces is None:  # fsdp2: whole parameters by owner, split ones in strategy.split
        pieces = [
            piece
            for i, owner in enumerate(strategy.owners)
            for piece in strategy.split.get(i, [Piece(i, owner, None)])
            if owner >= 0
        ]
    costs = []
    for piece in pieces:
        cost, spec = strategy.costs[piece.param], strategy.specs[piece.param]
        share = 1.0 if piece.rows is None else len(piece.rows) / spec.rows
        costs.append(BlockCost(cost.flops * share, int(cost.state_bytes * share)))
    return costs, [piece.owner for piece in pieces]


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], "bench_scaling")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--strategies", default="ddp,fsdp2,fsdp2_local,fsdp2_tp")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    args = p.parse_args()
    report: dict[str, dict] = {}
    header = f"{'strategy':12s} {'world':>5s} {'step ms (max rank)':>19s} {'state MiB (max)':>16s}"
    print(f"{header} {'state MiB (total)':>18s} {'balance flops':>14s} {'balance bytes':>14s}")
    for strategy in args.strategies.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            if strategy == "fsdp2_tp" and world != 4:
                continue
            per_rank = run_ranks(
                measure, world, strategy, args.steps, args.block_size, args.vocab, timeout=900
            )
            seconds = max(r["seconds"] for r in per_rank)
            states = [r["state_bytes"] for r in per_rank]
            balance = per_rank[0]["balance"] or {"flops": 1.0, "state_bytes": 1.0}
            report.setdefault(strategy, {})[world] = {
                "step_seconds_max_rank": seconds,
                "state_bytes": states,
                "balance": balance,
            }
            print(
                f"{strategy:12s} {world:5d} {seconds * 1e3:19.1f} {max(states) / 2**20:16.2f} "
                f"{sum(states) / 2**20:18.2f} {balance['flops']:14.3f} "
                f"{balance['state_bytes']:14.3f}",
                flush=True,
            )
    write_results(args.out, report)


if __name__ == "__main__":
    main()
