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

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distsoap import SOAP, ReferenceSOAP

PRESETS = {
    # d_model, layers, vocab, max_precond_dim (vocab side above it: one-sided embedding)
    "cpu": dict(d_model=256, layers=4, vocab=4096, max_precond_dim=2048),
    "gpu": dict(d_model=1024, layers=12, vocab=50304, max_precond_dim=8192),
}


def gpt_shapes(d_model: int, layers: int, vocab: int, **_) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT block stack: qkv, proj, MLP, norms, embedding, final norm."""
    per_layer = [
        (3 * d_model, d_model),
        (d_model, d_model),
        (4 * d_model, d_model),
        (d_model, 4 * d_model),
        (d_model,),
        (d_model,),
        (d_model,),
        (d_model,),
    ]
    return [(vocab, d_model)] + per_layer * layers + [(d_model,), (d_model,)]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_optimizer(make: Callable, shapes, grads, frequency, cycles, device) -> float:
    """Seconds per step over ``cycles`` refresh cycles, after one warm-up cycle."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.02) for s in shapes]
    opt = make(params)
    k = 0

    def step():
        nonlocal k
        for p, g in zip(params, grads[k % len(grads)]):
            p.grad = g
        opt.step()
        k += 1

    for _ in range(frequency + 1):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(cycles * frequency):
        step()
    sync(device)
    return (time.perf_counter() - start) / (cycles * frequency)


def time_floor(shapes, grads, max_dim, frequency, cycles, device) -> float:
    """Seconds per step of the unavoidable products, refresh amortised over the cycle."""
    mats = [(g, [d if d <= max_dim else None for d in g.shape]) for g in grads[0] if g.dim() == 2]
    bases = [
        [torch.linalg.qr(torch.randn(d, d, device=device))[0] if d else None for d in ds]
        for _, ds in mats
    ]
    factors = [[b @ b.T if b is not None else None for b in bs] for bs in bases]

    def per_step():
        for (g, _), (ql, qr) in zip(mats, bases):
            x = ql.T @ g if ql is not None else g  # rotate in
            x = x @ qr if qr is not None else x
            x = ql @ x if ql is not None else x  # rotate out
            x = x @ qr.T if qr is not None else x
            if ql is not None:
                g @ g.T  # factor products
            if qr is not None:
                g.T @ g

    def refresh():
        for fs, bs in zip(factors, bases):
            for f, b in zip(fs, bs):
                if f is not None:
                    torch.linalg.qr(f @ b)

    per_step()
    refresh()
    sync(device)
    start = time.perf_counter()
    for _ in range(cycles * frequency):
        per_step()
    sync(device)
    products = (time.perf_counter() - start) / (cycles * frequency)
    start = time.perf_counter()
    for _ in range(cycles):
        refresh()
    sync(device)
    return products + (time.perf_counter() - start) / cycles / frequency


def optimizers(max_dim: int, frequency: int) -> dict[str, Callable]:
    """The contenders, all with SOAP's reference hyperparameters where they apply."""
    common = dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, eps=1e-8)
    makers: dict[str, Callable] = {
        "distsoap": lambda ps: SOAP(
            ps, precondition_frequency=frequency, max_precond_dim=max_dim, **common
        ),
        "reference (per-param)": lambda ps: ReferenceSOAP(
            ps, precondition_frequency=frequency, max_precond_dim=max_dim, **common
        ),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, foreach=True, **common),
    }
    try:
        from pytorch_optimizer import SOAP as PytorchOptimizerSOAP

        makers["pytorch-optimizer SOAP"] = lambda ps: PytorchOptimizerSOAP(
            ps, precondition_frequency=frequency, max_precondition_dim=max_dim, **common
        )
    except ImportError as error:
        print(f"pytorch-optimizer not available: {error}")
    try:
        import heavyball

        heavyball.utils.compile_mode = None  # no torch.compile: measure the eager step
        makers["heavyball SOAP"] = lambda ps: heavyball.SOAP(
            ps,
            precondition_frequency=frequency,
            max_precond_dim=max_dim,
            merge_dims=False,
            use_precond_schedule=False,
            **common,
        )
    except ImportError as error:
        print(f"heavyball not available: {error}")
    return makers


def timing_parser(
    description: str, presets: dict, out: str, cycles: int = 2
) -> argparse.ArgumentParser:
    """The options the timing benchmarks share: --preset, --device, --frequency, --cycles, --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(presets), default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frequency", type=int, default=10)
    p.add_argument("--cycles", type=int, default=cycles)
    p.add_argument("--out", type=Path, default=Path(out))
    return p


def chosen_preset(presets: dict, name: str | None, device: torch.device):
    """The named preset, else the device's (``gpu`` on CUDA, ``cpu`` otherwise)."""
    return presets[name or ("gpu" if device.type == "cuda" else "cpu")]


def write_results(out: Path, device: torch.device, **results) -> None:
    """Write ``results`` as JSON to ``out``, with the machine and the torch version."""
    machine = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": machine, "torch": torch.__version__, **results}, indent=1)
    )


def main() -> None:
    p = timing_parser(__doc__.splitlines()[0], PRESETS, "benchmarks/results/bench_step.json")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated subset of contenders")
    args = p.parse_args()
    device = torch.device(args.device)
    preset = chosen_preset(PRESETS, args.preset, device)
    shapes = gpt_shapes(**preset)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(3)]
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
        floor = time_floor(
            shapes, grads, preset["max_precond_dim"], args.frequency, args.cycles, device
        )
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
    write_results(
        args.out, device, preset=preset, ms_per_step={k: v * 1e3 for k, v in best.items()}
    )


if __name__ == "__main__":
    main()
