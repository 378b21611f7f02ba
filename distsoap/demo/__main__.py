"""``python -m distsoap.demo``: SOAP vs AdamW on a small byte-level GPT, same data and init.

Writes ``loss_curves.png`` and ``summary.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from distsoap.demo.corpus import ByteBatches, load_corpus
from distsoap.demo.model import GPT, GPTConfig
from distsoap.demo.report import plot_losses, summarize
from distsoap.demo.train import RunConfig, train_run

# Peak learning rates picked by benchmarks/sweep_lr.py (see BENCHMARKS.md).
DEFAULT_LR = {"soap": 6e-3, "adamw": 3e-3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m distsoap.demo", description=__doc__)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--corpus-bytes", type=int, default=4 * 2**20)
    p.add_argument("--soap-lr", type=float, default=DEFAULT_LR["soap"])
    p.add_argument("--adamw-lr", type=float, default=DEFAULT_LR["adamw"])
    p.add_argument("--optimizers", default="soap,adamw", help="comma-separated: soap, adamw")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "context", "layers", "d_model", "heads", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = set(args.optimizers) - set(DEFAULT_LR)
    if unknown or not args.optimizers:
        p.error(f"--optimizers takes soap and/or adamw, got {args.optimizers}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the demo and return the summary it writes."""
    args = parse_args(argv)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is optional; the demo extra installs it
        tqdm = None
    device = torch.device(args.device)
    cfg = GPTConfig(
        context=args.context, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads
    )
    data = ByteBatches(load_corpus(args.corpus_bytes), args.context)
    torch.manual_seed(args.seed)
    initial = GPT(cfg).to(device)
    results = []
    for name in args.optimizers:
        lr = args.soap_lr if name == "soap" else args.adamw_lr
        run = RunConfig(
            optimizer=name,
            lr=lr,
            steps=args.steps,
            batch_size=args.batch_size,
            eval_every=args.eval_every,
            seed=args.seed,
        )
        bar = None
        if tqdm is not None and not args.no_progress:
            bar = tqdm(total=args.steps, desc=f"{name} lr={lr:g}", file=sys.stderr)
        results.append(train_run(copy.deepcopy(initial), data, run, device, bar))
        if bar is not None:
            bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, vars(args) | {"out": str(args.out), "device": str(device)})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_losses(results, args.out / "loss_curves.png")
    print(json.dumps(summary["headline"], indent=2))
    print(f"wrote {args.out / 'loss_curves.png'} and {args.out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
