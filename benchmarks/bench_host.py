"""Host overhead of one optimizer step: many tiny tensors, so the math itself is negligible.

What is left of a step on such a set is Python and the launch of each tensor operation, the
part of a step that does not shrink on a faster device and that a per-parameter loop
multiplies. For every contender, in one run and on the same gradients: the time of one
``optimizer.step()`` (mean over ``--cycles`` refresh cycles, refresh steps included, after one
warm-up cycle; best of ``--repeats``) and the aten operations one step dispatches (views
aside), averaged over one refresh cycle, at several tensor counts. On a GPU each operation on
device tensors is a kernel launch; reads of a value into Python by ``.item()`` are counted
apart: a sync for a GPU tensor, nothing for a CPU one (torch's AdamW reads its CPU step
counters that way). distsoap reads its finiteness flags with one ``.tolist()`` per step,
which does not dispatch and is not counted.

    python benchmarks/bench_host.py                 # CPU (about a minute here)
    python benchmarks/bench_host.py --device cuda   # adds fused AdamW
"""

from __future__ import annotations

import torch
from common import (
    HPARAMS,
    TINY_LAYERS,
    TINY_WIDTH,
    base_parser,
    optimizers,
    random_grads,
    time_optimizer,
    tiny_gpt_shapes,
    write_results,
)

from distsoap.testing.op_count import CountOps


def ops_per_step(make, shapes, grads, frequency: int, device) -> tuple[float, float]:
    """Mean aten ops (views aside) per step over one refresh cycle, and of those the reads.

    Reads are of a value into Python by ``.item()`` (``.tolist()`` is not dispatched, so not
    seen). Counted after a warm-up cycle.
    """
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    opt = make(params)

    def step(k: int) -> None:
        for p, g in zip(params, grads[k % len(grads)]):
            p.grad = g
        opt.step()

    for k in range(frequency + 1):
        step(k)
    with CountOps() as counter:
        for k in range(frequency):
            step(k)
    return counter.count / frequency, counter.scalar_reads / frequency


def main() -> None:
    p = base_parser(
        __doc__.splitlines()[0],
        "bench_host",
        device=True,
        repeats=3,
        presets={"cpu": {}},
        cycles=2,
    )
    args = p.parse_args()
    device = torch.device(args.device)
    makers = optimizers(max_dim=10_000, frequency=args.frequency)
    if device.type == "cuda":
        makers["torch AdamW (fused)"] = lambda ps: torch.optim.AdamW(ps, fused=True, **HPARAMS)
    rows = []
    for layers in TINY_LAYERS:
        shapes = tiny_gpt_shapes(layers)
        grads = random_grads(shapes, device)
        for name, make in makers.items():
            seconds = min(
                time_optimizer(make, shapes, grads, args.frequency, args.cycles, device)
                for _ in range(args.repeats)
            )
            ops, reads = ops_per_step(make, shapes, grads, args.frequency, device)
            rows.append(
                dict(tensors=len(shapes), contender=name, ms=seconds * 1e3, ops=ops, reads=reads)
            )
            print(f"{len(shapes):5d} tensors  {name:28s} {seconds * 1e3:8.2f} ms  {ops:8.1f} ops")
    header = f"{'ms/step':>8s} {'x AdamW':>8s} {'ops/step':>9s} {'of which reads':>14s}"
    print(f"\n{'tensors':>7s} {'contender':28s} {header}")
    for row in rows:
        adamw = next(
            r["ms"]
            for r in rows
            if r["tensors"] == row["tensors"] and r["contender"] == "torch AdamW (foreach)"
        )
        print(
            f"{row['tensors']:7d} {row['contender']:28s} {row['ms']:8.2f} "
            f"{row['ms'] / adamw:7.2f}x {row['ops']:9.1f} {row['reads']:14.1f}"
        )
    write_results(args.out, dict(width=TINY_WIDTH, rows=rows), device)


if __name__ == "__main__":
    main()
