"""Whole training step (forward, backward, optimizer) with distsoap vs AdamW, side by side.

A GPT from distsoap.demo: the demo's size on CPU (0.84M parameters, batch 32 x 128), GPT-2
small's shape on a GPU (12 layers, d_model 768, context 1024, batch 8; byte vocabulary).
AdamW is torch's foreach implementation on CPU and its fused one on CUDA. Steps are timed over
two refresh cycles after a warm-up cycle; the overhead is SOAP's step time over AdamW's - 1.

    python benchmarks/bench_train.py [--preset cpu|gpu]
"""

from __future__ import annotations

import itertools

import torch
from common import base_parser, chosen_preset, time_calls, write_results

from distsoap import SOAP
from distsoap.demo.model import GPT, GPTConfig

PRESETS = {
    "cpu": dict(model=GPTConfig(), batch=32),
    "gpu": dict(model=GPTConfig(context=1024, n_layers=12, d_model=768, n_heads=12), batch=8),
}


def time_training(name: str, preset: dict, frequency: int, cycles: int, device) -> float:
    """Mean seconds per training step."""
    torch.manual_seed(0)
    cfg = preset["model"]
    model = GPT(cfg).to(device)
    if name == "soap":
        opt = SOAP(model.parameters(), lr=3e-3, precondition_frequency=frequency)
    else:
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, **fused)
    gen = torch.Generator().manual_seed(0)
    data = [
        torch.randint(0, 256, (preset["batch"], cfg.context), generator=gen).to(device)
        for _ in range(4)
    ]

    counter = itertools.count()

    def step() -> None:
        x = data[next(counter) % 4]
        _, loss = model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    timing = time_calls(step, device, warmup=frequency + 1, repeats=1, number=cycles * frequency)
    return timing.times[0]


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], "bench_train", device=True, presets=PRESETS, cycles=2)
    args = p.parse_args()
    device = torch.device(args.device)
    preset = chosen_preset(PRESETS, args.preset, device)
    results = {
        n: time_training(n, preset, args.frequency, args.cycles, device) for n in ("adamw", "soap")
    }
    overhead = results["soap"] / results["adamw"] - 1
    for name, seconds in results.items():
        print(f"{name:6s} {seconds * 1e3:9.1f} ms / training step")
    print(
        f"SOAP overhead over AdamW: {overhead * 100:.1f}% (precondition_frequency "
        f"{args.frequency}, {device})"
    )
    figures = {"device": str(device), "seconds": results, "overhead": overhead}
    write_results(args.out, figures, device)


if __name__ == "__main__":
    main()
