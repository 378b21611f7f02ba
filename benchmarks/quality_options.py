"""SOAP's state and refresh options on the demo task: final validation loss against the default.

Every (configuration, seed) run is the demo's single-process training run (``distsoap.demo``'s
model, corpus, schedule, clipping and evaluation, its tuned peak lr: SOAP 1.2e-2, AdamW 3e-3),
with SOAP given the configuration's options on top of the demo's own (``--soap-lr`` and
``--adamw-lr`` change the lrs). A seed fixes both the initialisation and the data order, shared
by every configuration.

The demo builds its SOAP without these options, so this script hands them in by replacing the
``SOAP`` class that ``distsoap.demo.train`` builds with a subclass that adds them (the demo's
own arguments win), for the duration of each run.

Results are written after every run, so an interrupted sweep keeps what it finished.

    python benchmarks/quality_options.py                    # the runs recorded in BENCHMARKS.md
    python benchmarks/quality_options.py --steps 20 --seeds 0 --configs default,lean
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any
from unittest import mock

import torch
from common import base_parser, write_results

import distsoap.demo.train as demo_train
from distsoap import SOAP
from distsoap.demo.__main__ import DEFAULT_LR
from distsoap.demo.corpus import ByteBatches, load_corpus
from distsoap.demo.model import GPT, GPTConfig
from distsoap.demo.train import RunConfig, train_run

# The lean combination: bf16 factors and bases, block_size 256, adaptive refresh at 0.1 (1e-3
# skips no refresh on real transformer gradients: see BENCHMARKS.md, issue 18's section).
LEAN = dict(factor_dtype="bf16", basis_dtype="bf16", block_size=256, refresh_tolerance=0.1)

CONFIGS: dict[str, dict[str, Any] | None] = {
    "default": {},
    "bf16_both": dict(factor_dtype="bf16", basis_dtype="bf16"),
    "block256": dict(block_size=256),
    "block128": dict(block_size=128),
    "one_sided": dict(one_sided=True),
    "adaptive0.1": dict(refresh_tolerance=0.1),
    "adaptive1e-3": dict(refresh_tolerance=1e-3),
    "lean": LEAN,
    "lean_tol1e-3": LEAN | dict(refresh_tolerance=1e-3),
    "lean_tol0.03": LEAN | dict(refresh_tolerance=0.03),
    "lean_tol0.05": LEAN | dict(refresh_tolerance=0.05),
    "lean_b128_tol0": LEAN | dict(block_size=128, refresh_tolerance=0.0),
    "lean_b128_tol0.1": LEAN | dict(block_size=128),
    "lean_b128_tol0.03": LEAN | dict(block_size=128, refresh_tolerance=0.03),
    "lean_b128_tol0.05": LEAN | dict(block_size=128, refresh_tolerance=0.05),
    "adamw": None,  # the demo's AdamW
    # one-sided by max_precond_dim for the non-square matrices (the 128 x 128 stay two-sided)
    "max_precond_dim255": dict(max_precond_dim=255),
}
EXTRA = (  # not in the default --configs
    "block128",
    "adaptive1e-3",
    "max_precond_dim255",
    "lean_b128_tol0",
    "lean_b128_tol0.1",
)


def soap_with(options: dict[str, Any], built: list[SOAP]) -> type[SOAP]:
    """A SOAP subclass that adds ``options`` and records every instance in ``built``."""

    class OptionedSOAP(SOAP):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **(options | kwargs))
            built.append(self)

    return OptionedSOAP


def run_one(
    name: str,
    initial: GPT,
    data: ByteBatches,
    seed: int,
    steps: int,
    lrs: dict[str, float],
) -> dict[str, Any]:
    """Train a copy of ``initial`` with configuration ``name``; return what it measured."""
    options = CONFIGS[name]
    optimizer = "adamw" if options is None else "soap"
    cfg = RunConfig(optimizer=optimizer, lr=lrs[optimizer], steps=steps, seed=seed)
    built: list[SOAP] = []
    start = time.perf_counter()
    with mock.patch.object(demo_train, "SOAP", soap_with(options or {}, built)):
        result = train_run(copy.deepcopy(initial), data, cfg, torch.device("cpu"))
    row: dict[str, Any] = {
        "config": name,
        "options": options,
        "seed": seed,
        "lr": cfg.lr,
        "final_val_loss": result.val_loss[-1],
        "eval_steps": result.eval_steps,
        "val_loss": result.val_loss,
        "seconds": round(time.perf_counter() - start, 1),
        "optimizer_seconds": round(result.optimizer_seconds, 1),
    }
    if built:
        opt = built[-1]
        n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
        row["state_bytes_per_param"] = opt.state_bytes() / n_params
        row["skipped_refreshes"] = sum(s.get("skipped_refreshes", 0) for s in opt.state.values())
        row["basis_fallbacks"] = sum(s.get("basis_fallbacks", 0) for s in opt.state.values())
    return row


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], "quality_options")
    p.add_argument("--configs", default=",".join(c for c in CONFIGS if c not in EXTRA))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--soap-lr", type=float, default=DEFAULT_LR["soap"])
    p.add_argument("--adamw-lr", type=float, default=DEFAULT_LR["adamw"])
    args = p.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = {"soap": args.soap_lr, "adamw": args.adamw_lr}
    data = ByteBatches(load_corpus(), GPTConfig().context)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        torch.manual_seed(seed)
        initial = GPT(GPTConfig())
        for name in names:
            rows.append(run_one(name, initial, data, seed, args.steps, lrs))
            row = rows[-1]
            extra = ""
            if "state_bytes_per_param" in row:
                extra = (
                    f", {row['state_bytes_per_param']:.2f} B/param, "
                    f"skipped {row['skipped_refreshes']}, fallbacks {row['basis_fallbacks']}"
                )
            print(
                f"{name:13s} seed={seed} val={row['final_val_loss']:.4f} "
                f"({row['seconds']} s, step {row['optimizer_seconds']} s{extra})",
                flush=True,
            )
            write_results(args.out, figures(rows, args.steps, names, lrs))
    summary = figures(rows, args.steps, names, lrs)["summary"]
    print(f"\n{'config':13s} {'mean final val':>15s} {'vs default':>11s}  per seed")
    for name, s in summary.items():
        diff = s.get("vs_default")
        diff = "" if diff is None else f"{diff:+.2%}"
        per_seed = "  ".join(f"{v:.4f}" for v in s["final_val_loss"])
        print(f"{name:13s} {s['mean']:15.4f} {diff:>11s}  {per_seed}")


def figures(
    rows: list[dict[str, Any]], steps: int, names: list[str], lrs: dict[str, float]
) -> dict[str, Any]:
    """The runs so far and, per configuration, the mean final loss and its difference."""
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        losses = [r["final_val_loss"] for r in rows if r["config"] == name]
        if losses:
            summary[name] = {"final_val_loss": losses, "mean": statistics.fmean(losses)}
    if "default" in summary:
        base = summary["default"]["mean"]
        for name, s in summary.items():
            if name != "default":
                s["vs_default"] = s["mean"] / base - 1
    return dict(steps=steps, lrs=lrs, summary=summary, runs=rows)


if __name__ == "__main__":
    main()
