"""Train the demo GPT on the bundled corpus with DeepSpeed and SOAP from a DeepSpeed JSON config.

Any DeepSpeed launcher starts it, 2 processes here (CPU: gloo; GPUs: NCCL)::

    cfg=launch/deepspeed/zero2.json
    deepspeed --num_gpus 2 launch/deepspeed/train.py --deepspeed_config $cfg
    torchrun --nproc_per_node 2 launch/deepspeed/train.py --deepspeed_config $cfg
    mpirun -np 2 python launch/deepspeed/train.py --deepspeed_config $cfg

The config's ``"optimizer": {"type": "SOAP", ...}`` resolves because this script imports
``distsoap.integrations.deepspeed`` before ``deepspeed.initialize``; ``--entry wrapper`` calls
``distsoap.integrations.deepspeed.initialize`` instead (same arguments, same result).
Prints one JSON line per rank at the end (losses, strategy, a checksum of the parameters), and
writes it to ``--report-dir``/rank<N>.json when given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch

import distsoap.integrations.deepspeed as ds_soap
from distsoap.demo.corpus import ByteBatches, load_corpus
from distsoap.demo.model import GPT, GPTConfig


def main() -> None:
    """Parse the arguments, train, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--corpus-bytes", type=int, default=2**20)
    parser.add_argument("--entry", choices=["plain", "wrapper"], default="plain")
    parser.add_argument("--report-dir", type=Path, default=None, help="write rank<N>.json here")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # under mpirun, DeepSpeed reads rank, size and the master address from MPI (mpi4py)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None

    torch.manual_seed(0)  # the same initial model on every rank
    cfg = GPTConfig(context=args.context, n_layers=args.layers, d_model=args.d_model, n_heads=4)
    model = GPT(cfg)
    initialize = ds_soap.initialize if args.entry == "wrapper" else deepspeed.initialize
    engine, _, _, _ = initialize(args=args, model=model, model_parameters=model.parameters())

    data = ByteBatches(load_corpus(args.corpus_bytes), args.context)
    generator = torch.Generator().manual_seed(1)  # the same global batches on every rank
    micro = engine.train_micro_batch_size_per_gpu()
    accumulate = engine.gradient_accumulation_steps()
    losses = []
    for _ in range(args.steps):
        for _ in range(accumulate):
            x, y = data.batch("train", micro * world, generator)
            x, y = (t[rank * micro : (rank + 1) * micro] for t in (x, y))
            if device is not None:
                x, y = x.to(device), y.to(device)
            _, loss = engine(x, y)
            engine.backward(loss)
            engine.step()
        losses.append(float(loss))
    soap = engine.basic_optimizer
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    report = {
        "rank": rank,
        "world": world,
        "strategy": soap.strategy.name,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "checksum": checksum,
    }
    print(f"rank {rank}: " + json.dumps(report), flush=True)
    if args.report_dir is not None:
        args.report_dir.mkdir(parents=True, exist_ok=True)
        (args.report_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
