"""Whole training step (forward, backward, optimizer) with distsoap vs AdamW, side by side.

A GPT from distsoap.demo: the demo's size on CPU (0.84M parameters, batch 32 x 128), GPT-2
small's shape on a GPU (12 layers, d_model 768, context 1024, batch 8; byte vocabulary).
AdamW is torch's foreach implementation on CPU and its fused one on CUDA. Steps are timed over
two refresh cycles after a warm-up cycle; the overhead is SOAP's step time over AdamW's - 1.

    python benchmarks/bench_train.py [--preset cpu|gpu]
"""

from __future__ import annotations

import json
import time

import torch
from bench_step import chosen_preset, timing_parser  # noqa: I001  (sibling script)

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

    def step(k: int) -> None:
        x = data[k % 4]
        _, loss = model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for k in range(frequency + 1):
        step(k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for k in range(cycles * frequency):
        step(k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (cycles * frequency)


def main() -> None:
    p = timing_parser(__doc__.splitlines()[0], PRESETS, "benchmarks/results/bench_train.json")
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"device": str(device), "seconds": results, "overhead": overhead}, indent=1)
    )


if __name__ == "__main__":
    main()
