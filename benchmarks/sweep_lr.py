"""Learning-rate sweep behind the demo's defaults: SOAP and AdamW on the demo task.

Every (optimizer, lr, seed) run uses the demo's model, data, schedule and clipping; a seed fixes
both the initialisation and the data order, shared by the two optimizers. Prints a table of
final validation losses and writes them to benchmarks/results/sweep_lr.json.

    python benchmarks/sweep_lr.py                     # the sweep recorded in BENCHMARKS.md
    python benchmarks/sweep_lr.py --steps 40 --lrs 3e-3 --seeds 0   # a quick look
"""

from __future__ import annotations

import copy
import json
import time

import torch
from common import base_parser, write_results

from distsoap.demo.corpus import ByteBatches, load_corpus
from distsoap.demo.model import GPT, GPTConfig
from distsoap.demo.train import RunConfig, steps_to_reach, train_run


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], "sweep_lr")
    p.add_argument("--optimizers", default="soap,adamw")
    p.add_argument("--lrs", default="1.5e-3,3e-3,6e-3,1.2e-2")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    data = ByteBatches(load_corpus(), GPTConfig().context)
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        initial = GPT(GPTConfig())
        for name in args.optimizers.split(","):
            for lr in lrs:
                cfg = RunConfig(optimizer=name, lr=lr, steps=args.steps, seed=seed)
                start = time.perf_counter()
                result = train_run(copy.deepcopy(initial), data, cfg, torch.device("cpu"))
                rows.append(
                    {
                        "optimizer": name,
                        "lr": lr,
                        "seed": seed,
                        "final_val_loss": result.val_loss[-1],
                        "eval_steps": result.eval_steps,
                        "val_loss": result.val_loss,
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                )
                print(
                    f"{name:6s} lr={lr:<8g} seed={seed} val={result.val_loss[-1]:.4f} "
                    f"({rows[-1]['seconds']} s)",
                    flush=True,
                )
    best = {}
    for name in args.optimizers.split(","):
        by_lr = {
            lr: [r["final_val_loss"] for r in rows if r["optimizer"] == name and r["lr"] == lr]
            for lr in lrs
        }
        lr, losses = min(by_lr.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
        best[name] = {"lr": lr, "mean_final_val_loss": sum(losses) / len(losses)}
    print("best (mean over seeds):", json.dumps(best))
    if "soap" in best and "adamw" in best:
        for seed in seeds:
            pick = {
                n: next(
                    r
                    for r in rows
                    if r["optimizer"] == n and r["seed"] == seed and r["lr"] == best[n]["lr"]
                )
                for n in ("soap", "adamw")
            }
            soap = type(
                "R",
                (),
                {"eval_steps": pick["soap"]["eval_steps"], "val_loss": pick["soap"]["val_loss"]},
            )
            reached = steps_to_reach(soap, pick["adamw"]["final_val_loss"])
            print(
                f"seed {seed}: SOAP reaches AdamW's final val loss at step {reached} "
                f"of {args.steps}"
            )
    write_results(args.out, {"steps": args.steps, "best": best, "runs": rows})


if __name__ == "__main__":
    main()
