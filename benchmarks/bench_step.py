"""Optimizer-step time on a GPT-shaped parameter set: distsoap vs peers, with the floor.

Compares, in one run and on the same gradients, the time of one ``optimizer.step()``:
- distsoap.SOAP (batched buckets),
- distsoap.ReferenceSOAP (the readable per-parameter reference, written like the public soap.py),
- torch.optim.AdamW (foreach),
- the SOAP of the PyPI packages ``pytorch-optimizer`` and ``heavyball`` (when installed),
and the *floor*: the matrix products one SOAP step cannot avoid (rotate the gradient in, the
update out, the two factor products) plus the refresh work (G G^T Q product and QR per factor)
amortised over the refresh cycle, timed as plain torch calls on the same shapes.

Every optimizer takes one warm-up cycle (the first call and ``precondition_frequency`` updates),
then the time of ``--cycles`` full refresh cycles is averaged per step; the best of ``--repeats``
rounds is kept. Ratios are taken within this one run.

    python benchmarks/bench_step.py                 # CPU preset (about a minute here)
    python benchmarks/bench_step.py --preset gpu    # full size, on CUDA
"""

from __future__ import annotations

import torch
from common import (
    GPT_PRESETS,
    base_parser,
    chosen_preset,
    gpt_shapes,
    optimizers,
    random_grads,
    time_floor,
    time_optimizer,
    write_results,
)


def main() -> None:
    p = base_parser(
        __doc__.splitlines()[0],
        "bench_step",
        device=True,
        repeats=2,
        presets=GPT_PRESETS,
        cycles=2,
    )
    p.add_argument("--only", default="", help="comma-separated subset of contenders")
    args = p.parse_args()
    device = torch.device(args.device)
    preset = chosen_preset(GPT_PRESETS, args.preset, device)
    shapes = gpt_shapes(**preset)
    grads = random_grads(shapes, device)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"{len(shapes)} tensors, {n_params / 1e6:.2f}M params, preset {preset}, {device}")

    makers = optimizers(preset["max_precond_dim"], args.frequency)
    if args.only:
        makers = {k: v for k, v in makers.items() if k in args.only.split(",")}
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, make in makers.items():
            seconds = time_optimizer(make, shapes, grads, args.frequency, args.cycles, device)
            best[name] = min(best.get(name, float("inf")), seconds)
        floor = time_floor(grads[0], preset["max_precond_dim"], args.frequency, args.cycles, device)
        best["floor (products + refresh)"] = min(
            best.get("floor (products + refresh)", float("inf")), floor
        )
    base = best.get("distsoap")
    print(f"\n{'contender':30s} {'ms/step':>9s} {'x distsoap':>11s}")
    for name, seconds in best.items():
        ratio = f"{seconds / base:10.2f}x" if base else ""
        print(f"{name:30s} {seconds * 1e3:9.1f} {ratio}")
    if base and "reference (per-param)" in best:
        print(
            f"\ndistsoap speed-up over the per-parameter reference: "
            f"{best['reference (per-param)'] / base:.2f}x"
        )
        print(f"distsoap / floor: {base / best['floor (products + refresh)']:.2f}x")
    figures = dict(preset=preset, ms_per_step={k: v * 1e3 for k, v in best.items()})
    write_results(args.out, figures, device)


if __name__ == "__main__":
    main()
