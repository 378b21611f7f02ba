"""Memory bandwidth achieved by the rotated-Adam update, against the device's own copy speed.

The update is memory bound: per element it reads the rotated gradient and both moments and
writes both moments and the direction (24 bytes with fp32 moments, 16 with bf16 moments). The
achieved rate (bytes / time) of each implementation is compared with the rate of a plain
device copy (``dst.copy_(src)``, read + write) of the same size measured in the same run: the
practical ceiling on this device. On CUDA the contenders are the Triton kernel (what
distsoap runs there), the eager torch definition and its ``torch.compile`` form; on CPU the
last two.

On CUDA it also times the Kronecker-factor update ``F <- beta F + (1 - beta) G G^T`` two ways:
torch's ``baddbmm`` (cuBLAS, the optimizer's path) and the one-triangle Triton kernel
(``kernels/symmetric_factor_triton.py``), reported as TFLOP/s of the full product.

    python benchmarks/bench_kernels.py                 # CPU (about a minute here)
    python benchmarks/bench_kernels.py --device cuda   # the Triton kernel, compiled for real
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from common import base_parser, time_calls, write_results
from distsoap.kernels import compiled_rotated_adam_direction, rotated_adam_direction_torch

# (blocks, rows, cols) of the stacks timed: a bucket of 256-wide and of 1024-wide matrices
SIZES = {"cpu": [(16, 256, 256), (16, 1024, 1024)], "cuda": [(64, 768, 768), (96, 3072, 768)]}
# (blocks, d, r) of factor updates: GPT-2 small's 768 x 768 and 3072-side factors
FACTOR_SIZES = [(48, 768, 768), (24, 768, 3072), (24, 3072, 768)]


def seconds_per_call(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best mean time of ``run`` over ``repeats`` rounds of 10 calls, after two warm-up calls."""
    return time_calls(run, device, warmup=2, repeats=repeats, number=10).best


def contenders(device: torch.device) -> dict[str, Callable]:
    """The implementations of the update that run on ``device``."""
    found: dict[str, Callable] = {}
    if device.type == "cuda":
        from distsoap.kernels import triton_available

        if triton_available():
            from distsoap.kernels.rotated_adam_triton import rotated_adam_direction_triton

            found["triton"] = rotated_adam_direction_triton
    found["torch eager"] = rotated_adam_direction_torch
    found["torch.compile"] = compiled_rotated_adam_direction
    return found


def factor_update_rows(device: torch.device, repeats: int) -> list[dict]:
    """Torch's baddbmm vs the one-triangle Triton kernel, GPT-2-small factors (CUDA only)."""
    from distsoap.kernels.symmetric_factor_triton import symmetric_factor_update_triton

    rows = []
    for batch, d, r in FACTOR_SIZES:
        g = torch.randn(batch, d, r, device=device)
        factor = torch.zeros(batch, d, d, device=device)
        flops = 2 * batch * d * d * r
        timed = {
            "baddbmm (cuBLAS)": partial(factor.baddbmm_, g, g.mT, beta=0.95, alpha=0.05),
            "triton one triangle": partial(symmetric_factor_update_triton, factor, g, 0.95),
        }
        for name, run in timed.items():
            seconds = seconds_per_call(run, device, repeats)
            row = dict(factor=[batch, d, r], contender=name, ms=seconds * 1e3)
            row["tflops_full_product"] = flops / seconds / 1e12
            rows.append(row)
            print(
                f"factor {(batch, d, r)} {name:20s} {row['ms']:8.3f} ms "
                f"{row['tflops_full_product']:6.1f} TFLOP/s"
            )
    return rows


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], "bench_kernels", device=True, repeats=3)
    args = p.parse_args()
    device = torch.device(args.device)
    rows = []
    for shape in SIZES[device.type]:
        numel = torch.Size(shape).numel()
        src = torch.randn(numel, device=device)
        dst = torch.empty_like(src)
        copy_rate = 2 * 4 * numel / seconds_per_call(partial(dst.copy_, src), device, args.repeats)
        del src, dst
        for moment_dtype, moment_bytes in ((torch.float32, 4), (torch.bfloat16, 2)):
            grad = torch.randn(shape, device=device)
            m = torch.zeros(shape, device=device, dtype=moment_dtype)
            v = torch.zeros(shape, device=device, dtype=moment_dtype)
            scale = torch.full((shape[0],), -1e-3, device=device)
            moved = numel * (4 + 4 * moment_bytes + 4)  # g in, m v in and out, direction out
            for name, update in contenders(device).items():
                if name == "torch.compile" and moment_dtype != torch.float32:
                    continue  # the compiled form takes fp32 moments only (eager otherwise)
                seconds = seconds_per_call(
                    partial(update, m, v, grad, 0.95, 0.95, 1e-8, scale),
                    device,
                    args.repeats,
                )
                rate = moved / seconds
                row = dict(
                    shape=list(shape),
                    moments=str(moment_dtype).removeprefix("torch."),
                    contender=name,
                    ms=seconds * 1e3,
                    gb_per_s=rate / 1e9,
                    copy_gb_per_s=copy_rate / 1e9,
                    fraction_of_copy=rate / copy_rate,
                )
                rows.append(row)
                print(
                    f"{str(tuple(shape)):18s} {row['moments']:9s} {name:14s} "
                    f"{row['ms']:8.3f} ms {row['gb_per_s']:8.1f} GB/s "
                    f"(copy {row['copy_gb_per_s']:.1f} GB/s) {row['fraction_of_copy']:6.1%}"
                )
    if device.type == "cuda":
        rows += factor_update_rows(device, args.repeats)
    write_results(args.out, dict(rows=rows), device)


if __name__ == "__main__":
    main()
