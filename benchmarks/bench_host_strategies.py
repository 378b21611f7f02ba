"""Host overhead of one distributed optimizer step: DDP and FSDP2, distsoap vs torch's AdamW.

The distributed companion of ``bench_host.py``: the same tiny GPT-shaped tensor sets (the math
is negligible, so what is left is Python, operation launches and the collectives' latency), on
``--world`` local gloo ranks. For each strategy the model is wrapped as a user would wrap it
(``DistributedDataParallel``, or ``fully_shard`` for FSDP2) and both optimizers step the same
wrapped model in one run: distsoap with that strategy (ddp gathers the owners' updates; fsdp2
sends gradient pieces to owners and update pieces back) and torch's foreach AdamW (local math
only: DDP already averaged the gradients, FSDP2 already reduce-scattered them). Time of
``optimizer.step()`` alone, mean over ``--cycles`` refresh cycles after one warm-up cycle, the
slowest rank's; best of ``--repeats``.

    python benchmarks/bench_host_strategies.py     # CPU, 2 gloo ranks (a few minutes here)
"""

from __future__ import annotations

import itertools

import torch
from common import (
    HPARAMS,
    TINY_LAYERS,
    TINY_WIDTH,
    base_parser,
    time_calls,
    tiny_gpt_shapes,
    write_results,
)

from distsoap import SOAP
from distsoap.testing.local_ranks import run_ranks

STRATEGIES = ("ddp", "fsdp2")
OPTIMIZERS = ("distsoap", "torch AdamW (foreach)")


class TinyTensors(torch.nn.Module):
    """One parameter per shape, scored by a random linear loss (gradients of every tensor)."""

    def __init__(self, shapes: list[tuple[int, ...]]):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(0.02 * torch.randn(s, generator=gen)) for s in shapes]
        )

    def forward(self, step: int, rank: int) -> torch.Tensor:
        """A loss whose gradients differ per step and per rank."""
        gen = torch.Generator().manual_seed(1000 * step + rank)
        return sum((w * torch.randn(w.shape, generator=gen)).sum() for w in self.weights)


def measure(rank: int, world: int, strategy: str, optimizer: str, layers: int, frequency, cycles):
    """Mean seconds of this rank's ``optimizer.step()`` over ``cycles`` refresh cycles."""
    torch.manual_seed(0)
    model = TinyTensors(tiny_gpt_shapes(layers))
    forward = model
    if strategy == "ddp":
        forward = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    if optimizer == "distsoap":
        opt = SOAP(
            model.parameters(), strategy=strategy, precondition_frequency=frequency, **HPARAMS
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), foreach=True, **HPARAMS)
    steps = itertools.count()

    def backward() -> None:
        opt.zero_grad(set_to_none=True)
        forward(next(steps), rank).backward()
        torch.distributed.barrier()  # every rank starts the step together: time the step only

    timing = time_calls(  # a warm-up cycle, then each step of ``cycles`` cycles timed alone
        opt.step, "cpu", warmup=frequency, repeats=cycles * frequency, setup=backward
    )
    return timing.mean


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], "bench_host_strategies", repeats=2, cycles=2)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args()
    rows = []
    for layers in TINY_LAYERS:
        tensors = len(tiny_gpt_shapes(layers))
        for strategy in STRATEGIES:
            for optimizer in OPTIMIZERS:
                seconds = min(
                    max(
                        run_ranks(
                            measure,
                            args.world,
                            strategy=strategy,
                            optimizer=optimizer,
                            layers=layers,
                            frequency=args.frequency,
                            cycles=args.cycles,
                            timeout=900,
                        )
                    )
                    for _ in range(args.repeats)
                )
                rows.append(
                    dict(tensors=tensors, strategy=strategy, optimizer=optimizer, ms=seconds * 1e3)
                )
                ms = seconds * 1e3
                print(f"{tensors:5d} tensors  {strategy:6s} {optimizer:24s} {ms:8.2f} ms")
    print(f"\n{'tensors':>7s} {'strategy':8s} {'optimizer':24s} {'ms/step':>8s} {'x AdamW':>8s}")
    for row in rows:
        adamw = next(
            r["ms"]
            for r in rows
            if (r["tensors"], r["strategy"]) == (row["tensors"], row["strategy"])
            and r["optimizer"] == "torch AdamW (foreach)"
        )
        print(
            f"{row['tensors']:7d} {row['strategy']:8s} {row['optimizer']:24s} {row['ms']:8.2f} "
            f"{row['ms'] / adamw:7.2f}x"
        )
    write_results(args.out, dict(world=args.world, width=TINY_WIDTH, rows=rows))


if __name__ == "__main__":
    main()
