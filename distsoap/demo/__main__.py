"""``python -m distsoap.demo``: SOAP vs AdamW on a small byte-level GPT, same data and init.

Writes ``loss_curves.png`` and ``summary.json`` into the output folder. Under torchrun
(``torchrun --standalone --nproc_per_node=2 -m distsoap.demo``) or mpirun (``mpirun -n 2 python
-m distsoap.demo``, see :mod:`distsoap.cluster.mpi`) it trains data-parallel: gloo on
CPU, NCCL on GPUs, each rank on its slice of every global batch; ``--strategy`` picks how SOAP is
distributed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distsoap.cluster.mpi import init_from_mpi, mpi_identity
from distsoap.cluster.process_group import init_distributed as join_process_group
from distsoap.cluster.process_group import release_process_groups
from distsoap.demo.corpus import ByteBatches, load_corpus
from distsoap.demo.model import GPT, GPTConfig
from distsoap.demo.report import plot_losses, summarize
from distsoap.demo.train import RunConfig, train_run

# Peak learning rates picked by benchmarks/sweep_lr.py (see BENCHMARKS.md).
DEFAULT_LR = {"soap": 1.2e-2, "adamw": 3e-3}


EPILOG = """\
scripts/demo.sh runs this under torchrun with one process per GPU (2 on a CPU); set
DISTSOAP_NPROC to choose the number of processes (DISTSOAP_NPROC=1: one plain process).
Arguments are checked once, before any process starts."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option; the description and epilog kept as written."""


def positive_float(text: str) -> float:
    """An argparse type: a finite real number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def missing_dependencies(args: argparse.Namespace) -> list[str]:
    """What the run will import that is not installed, each with the extra that installs it.

    Checked before the first step, so a missing package fails in a second, not after training.
    """
    needs = {"matplotlib": "demo"}  # the plot, written at the end
    if args.strategy == "deepspeed":
        needs["deepspeed"] = "deepspeed"
    return [
        f"{module} (pip install -e '.[{extra}]', or: pip install 'distsoap[{extra}]')"
        for module, extra in needs.items()
        if importlib.util.find_spec(module) is None
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, checked (ranges, installed dependencies)."""
    p = argparse.ArgumentParser(
        prog="python -m distsoap.demo",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--check-args",
        action="store_true",
        help=argparse.SUPPRESS,  # scripts/demo.sh: check once, before torchrun starts ranks
    )
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--corpus-bytes", type=int, default=4 * 2**20)
    p.add_argument("--soap-lr", type=positive_float, default=DEFAULT_LR["soap"])
    p.add_argument("--adamw-lr", type=positive_float, default=DEFAULT_LR["adamw"])
    p.add_argument("--optimizers", default="soap,adamw", help="comma-separated: soap, adamw")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="save checkpoints here and resume from the newest one automatically",
    )
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument(
        "--simulate-failure-at-step",
        type=int,
        default=None,
        help="for testing restarts: the last rank kills itself after this step on the job's "
        "first attempt (use with --checkpoint-dir and torchrun --max-restarts)",
    )
    p.add_argument(
        "--strategy",
        choices=["auto", "single", "ddp", "zero2", "fsdp2", "hsdp", "fsdp2_local", "deepspeed"],
        default="auto",
        help="distribution under torchrun: ddp (DDP-wrapped model, sharded SOAP), zero2 "
        "(no DDP wrapper, SOAP syncs gradients), fsdp2 / hsdp (FSDP2 on a 1-D / (2, world/2) "
        "mesh, lossless SOAP), fsdp2_local (SOAP on local shards, approximate), deepspeed "
        "(DeepSpeed ZeRO-2; SOAP lossless on its partitions), single (every rank computes "
        "everything); auto: ddp under torchrun, else single",
    )
    args = p.parse_args(argv)
    numbers = (
        "steps",
        "batch_size",
        "context",
        "layers",
        "d_model",
        "heads",
        "eval_every",
        "checkpoint_every",
    )
    for name in numbers:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = set(args.optimizers) - set(DEFAULT_LR)
    if unknown or not args.optimizers:
        p.error(f"--optimizers takes soap and/or adamw, got {args.optimizers}")
    missing = missing_dependencies(args)
    if missing:
        p.error("not installed: " + "; ".join(missing))
    if args.check_args:
        raise SystemExit(0)
    return args


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Join the process group when launched by torchrun or mpirun; return rank, world, device."""
    device = torch.device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    identity = None if "WORLD_SIZE" in os.environ else mpi_identity()
    if identity is not None and identity.size > 1:  # mpirun: MPI says who we are
        init_from_mpi(backend)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        join_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> dict:
    """Run the demo and return the summary it writes (rank 0; other ranks return {})."""
    args = parse_args(argv)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is optional; the demo extra installs it
        tqdm = None
    rank, world, device = init_distributed(args.device)
    if rank == 0:
        print(
            f"demo: {world} process(es), {torch.get_num_threads()} CPU thread(s) each "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})",
            file=sys.stderr,
        )
    strategy = args.strategy
    if strategy == "auto":
        strategy = "ddp" if dist.is_initialized() else "single"
    if strategy != "single" and not dist.is_initialized():
        raise SystemExit(f"--strategy {strategy} needs torchrun (several processes)")
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
            strategy=strategy,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            fail_at_step=args.simulate_failure_at_step,
        )
        bar = None
        if tqdm is not None and not args.no_progress and rank == 0:
            bar = tqdm(total=args.steps, desc=f"{name} lr={lr:g}", file=sys.stderr)
        results.append(train_run(copy.deepcopy(initial), data, run, device, bar))
        if bar is not None:
            bar.close()
    if rank != 0:
        release_process_groups()
        return {}
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {
        "device": str(device),
        "strategy": strategy,
        "world_size": world,
    }
    summary = summarize(results, settings)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    setup = f"strategy {strategy}, {world} rank{'s' if world > 1 else ''}, {device.type}"
    plot_losses(results, args.out / "loss_curves.png", setup)
    print(json.dumps(summary["headline"], indent=2))
    if "verdict" in summary["headline"]:
        print(summary["headline"]["verdict"])
    print(f"wrote {args.out / 'loss_curves.png'} and {args.out / 'summary.json'}")
    release_process_groups()
    return summary


if __name__ == "__main__":
    main()
