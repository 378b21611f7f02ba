"""distsoap SOAP vs AdamW under DeepSpeed ZeRO stages 0-3: step time and optimizer state.

Both optimizers come from the same JSON config (``"type": "SOAP"`` / ``"type": "AdamW"``, torch's
AdamW: DeepSpeed's fused and CPU Adam need ops built ahead) and train the demo GPT on the bundled
corpus on local ranks, same data, same model. Reported per stage, measured side by side in one
run: mean time of ``engine.step()`` (the optimizer, including SOAP's exchanges and refreshes;
``precondition_frequency`` 10, so the measured window holds its refreshes), mean time of the
whole training step, and the optimizer state bytes on the largest rank (SOAP: its per-block
state on the owner; AdamW: DeepSpeed's partitioned moments).

    python benchmarks/bench_deepspeed.py [--world 2] [--steps 20] [--stages 0,1,2,3]
"""

from __future__ import annotations

import time

import torch
from common import base_parser, write_results

from distsoap.demo.corpus import ByteBatches, load_corpus
from distsoap.demo.model import GPT, GPTConfig
from distsoap.testing.local_ranks import run_ranks

WARMUP = 3
MICRO_BATCH = 8


def _config(optimizer: str, stage: int) -> dict:
    params = {"lr": 3e-3, "betas": [0.95, 0.95], "weight_decay": 0.01}
    if optimizer == "SOAP":
        params["precondition_frequency"] = 10
    else:
        params["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "optimizer": {"type": optimizer, "params": params},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _state_bytes(optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )


def measure(rank: int, world: int, optimizer: str, stage: int, steps: int) -> dict:
    """Mean step times and this rank's optimizer state for one (optimizer, stage)."""
    from distsoap.integrations.deepspeed import initialize

    torch.manual_seed(0)
    cfg = GPTConfig()
    model = GPT(cfg)
    engine, *_ = initialize(
        model=model, model_parameters=model.parameters(), config=_config(optimizer, stage)
    )
    data = ByteBatches(load_corpus(2**20), cfg.context)
    generator = torch.Generator().manual_seed(1)
    step_times, total_times = [], []
    for step in range(WARMUP + steps):
        start = time.perf_counter()
        x, y = data.batch("train", MICRO_BATCH * world, generator)
        x, y = (t[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH] for t in (x, y))
        _, loss = engine(x, y)
        engine.backward(loss)
        before_step = time.perf_counter()
        engine.step()
        end = time.perf_counter()
        if step >= WARMUP:
            step_times.append(end - before_step)
            total_times.append(end - start)
    return {
        "step_ms": 1e3 * sum(step_times) / len(step_times),
        "train_step_ms": 1e3 * sum(total_times) / len(total_times),
        "state_bytes": _state_bytes(engine.basic_optimizer),
        "loss": loss.item(),
    }


def main() -> None:
    """Run every stage for both optimizers and print the ratios."""
    parser = base_parser(__doc__.splitlines()[0], "bench_deepspeed")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stages", default="0,1,2,3")
    args = parser.parse_args()
    rows = []
    header = (
        f"{'stage':>5} {'SOAP step ms':>12} {'AdamW step ms':>13} {'ratio':>6} "
        f"{'SOAP train ms':>13} {'AdamW train ms':>14} {'ratio':>6} "
        f"{'SOAP state MiB':>14} {'AdamW state MiB':>15}"
    )
    print(f"DeepSpeed ZeRO, {args.world} ranks, demo GPT {GPTConfig()}")
    print(header)
    for stage in (int(s) for s in args.stages.split(",")):
        by_optimizer = {}
        for optimizer in ("SOAP", "AdamW"):
            results = run_ranks(
                measure,
                args.world,
                optimizer=optimizer,
                stage=stage,
                steps=args.steps,
                timeout=1200,
            )
            by_optimizer[optimizer] = {
                "step_ms": max(r["step_ms"] for r in results),
                "train_step_ms": max(r["train_step_ms"] for r in results),
                "max_state_mib": max(r["state_bytes"] for r in results) / 2**20,
            }
        soap, adamw = by_optimizer["SOAP"], by_optimizer["AdamW"]
        rows.append({"stage": stage, "soap": soap, "adamw": adamw})
        print(
            f"{stage:>5} {soap['step_ms']:>12.1f} {adamw['step_ms']:>13.1f} "
            f"{soap['step_ms'] / adamw['step_ms']:>6.2f} {soap['train_step_ms']:>13.1f} "
            f"{adamw['train_step_ms']:>14.1f} "
            f"{soap['train_step_ms'] / adamw['train_step_ms']:>6.2f} "
            f"{soap['max_state_mib']:>14.2f} {adamw['max_state_mib']:>15.2f}",
            flush=True,
        )
    write_results(args.out, {"world": args.world, "rows": rows})


if __name__ == "__main__":
    main()
