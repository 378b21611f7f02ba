"""Per-step optimizer time over several refresh cycles: aligned vs staggered refreshes.

With the reference's aligned schedule every block runs its QR refresh on the same step, one
step in ``precondition_frequency``; staggered spreads the refreshes so every step carries about
the same share. Prints median, p99 and max step time and p99 / median (target <= 1.2 staggered).

    python benchmarks/bench_spike.py [--cycles 4]
"""

from __future__ import annotations

import torch
from common import GPT_PRESETS, base_parser, chosen_preset, gpt_shapes, time_calls, write_results

from distsoap import SOAP


def step_times(schedule: str, preset: dict, frequency: int, cycles: int, device) -> list[float]:
    """Seconds of each step over ``cycles`` refresh cycles, after the first call and one cycle."""
    gen = torch.Generator().manual_seed(0)
    shapes = gpt_shapes(**preset)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(3)]
    opt = SOAP(
        params,
        precondition_frequency=frequency,
        refresh_schedule=schedule,
        max_precond_dim=preset["max_precond_dim"],
    )
    k = 0

    def next_grads() -> None:
        nonlocal k
        for p, g in zip(params, grads[k % 3]):
            p.grad = g
        k += 1

    timing = time_calls(  # first call + a warm-up cycle, then one step per timed round
        opt.step, device, warmup=1 + frequency, repeats=cycles * frequency, setup=next_grads
    )
    return timing.times


def main() -> None:
    p = base_parser(
        __doc__.splitlines()[0], "bench_spike", device=True, presets=GPT_PRESETS, cycles=4
    )
    args = p.parse_args()
    device = torch.device(args.device)
    preset = chosen_preset(GPT_PRESETS, args.preset, device)
    report = {}
    print(f"{'schedule':10s} {'median ms':>10s} {'p99 ms':>8s} {'max ms':>8s} {'p99/median':>11s}")
    for schedule in ("aligned", "staggered"):
        times = sorted(step_times(schedule, preset, args.frequency, args.cycles, device))
        median = times[len(times) // 2]
        p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
        report[schedule] = {
            "median_s": median,
            "p99_s": p99,
            "max_s": times[-1],
            "p99_over_median": p99 / median,
            "steps": len(times),
        }
        print(
            f"{schedule:10s} {median * 1e3:10.1f} {p99 * 1e3:8.1f} {times[-1] * 1e3:8.1f} "
            f"{p99 / median:10.2f}x"
        )
    write_results(args.out, {"preset": preset, "device": str(device), **report}, device)


if __name__ == "__main__":
    main()
