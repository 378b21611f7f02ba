"""distsoap SOAP vs AdamW under DeepSpeed ZeRO stages 0-3: step time and optimizer state.

Both optimizers come from the same JSON config (``"type": "SOAP"`` / ``"type": "AdamW"``, torch's
AdamW: DeepSpeed's fused and CPU Adam need ops built ahead) and train the demo GPT on the bundled
corpus on local ranks, same data, same model. Reported per stage, measured side by side in one
run: mean time of ``engine.step()`` (the optimizer, including SOAP's exchanges and refreshes;
``precondition_frequency`` 10, so the measured window holds its refreshes), mean time of the
whole training step, and the optimizer state bytes on the largest rank (SOAP: its per-block
state on the owner; AdamW: DeepSpeed's partitioned moments).

With ``--block-size B`` two more SOAP runs per stage use ``block_size=B``: "blocks", where the
placement may give a large parameter's blocks several owners, and "blocks, whole", with every
parameter kept on one owner (the placement before blocks had owners of their own); at stages
1-3 a third, "blocks, assembler", sends the split parameters through one owner's round trip
instead of straight between partitions and owners (what the direct exchange replaced). ``--vocab``
widens the demo GPT's embedding (tied output head; the byte data use ids below 256 only) so that
one parameter dominates, as a real vocabulary does.

    python benchmarks/bench_deepspeed.py [--world 2] [--steps 20] [--stages 0,1,2,3]
    python benchmarks/bench_deepspeed.py --world 3 --block-size 128 --vocab 16384 \
        --out benchmarks/results/bench_deepspeed_blocks.json
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


def _config(optimizer: str, stage: int, block_size: int | None = None, whole: bool = False) -> dict:
    params = {"lr": 3e-3, "betas": [0.95, 0.95], "weight_decay": 0.01}
    if optimizer == "SOAP":
        params["precondition_frequency"] = 10
        if block_size is not None:
            params["block_size"] = block_size
        if whole:
            params["split_blocks"] = "never"
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


def measure(
    rank: int,
    world: int,
    optimizer: str,
    stage: int,
    steps: int,
    block_size: int | None = None,
    whole: bool = False,
    vocab: int = 256,
    assembler: bool = False,
) -> dict:
    """Mean step times and this rank's optimizer state for one (optimizer, stage).

    ``block_size``: SOAP's; ``whole``: ``split_blocks="never"``, every parameter on one owner;
    ``vocab``: the embedding's rows; ``assembler``: split parameters take the assembler's round
    trip (in this rank's process).
    """
    from distsoap.integrations.deepspeed import initialize
    from distsoap.strategies.sharded import ShardedLossless

    ShardedLossless.direct_exchange = not assembler

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab)
    model = GPT(cfg)
    config = _config(optimizer, stage, block_size, whole)
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=config)
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
    strategy = getattr(engine.basic_optimizer, "strategy", None)
    stats = getattr(engine.basic_optimizer, "comm_stats", None)
    sent = sum(stats["total_bytes"].values()) if stats else 0
    return {
        "sent_kib_per_step": sent / 1024 / (WARMUP + steps),
        "step_ms": 1e3 * sum(step_times) / len(step_times),
        "train_step_ms": 1e3 * sum(total_times) / len(total_times),
        "state_bytes": _state_bytes(engine.basic_optimizer),
        "split": len(getattr(strategy, "split", ())),
        "loss": loss.item(),
    }


def main() -> None:
    """Run every stage for every contender and print the ratios to AdamW."""
    parser = base_parser(__doc__.splitlines()[0], "bench_deepspeed")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--block-size", type=int, default=None, help="add the blocks runs")
    parser.add_argument("--vocab", type=int, default=256, help="embedding rows")
    args = parser.parse_args()
    contenders = {"soap": dict(optimizer="SOAP"), "adamw": dict(optimizer="AdamW")}
    if args.block_size is not None:
        blocks = dict(optimizer="SOAP", block_size=args.block_size)
        contenders["soap_blocks"] = blocks
        contenders["soap_blocks_whole"] = blocks | dict(whole=True)
        contenders["soap_blocks_assembler"] = blocks | dict(assembler=True)
    rows = []
    header = (
        f"{'stage':>5} {'contender':>21} {'step ms':>8} {'x AdamW':>8} {'train ms':>9} "
        f"{'x AdamW':>8} {'state MiB (max)':>15} {'total MiB':>10} {'split':>5} "
        f"{'SOAP sent KiB/step (max)':>24}"
    )
    print(f"DeepSpeed ZeRO, {args.world} ranks, demo GPT {GPTConfig(vocab_size=args.vocab)}")
    print(header)
    for stage in (int(s) for s in args.stages.split(",")):
        row: dict = {"stage": stage}
        for name, options in contenders.items():
            if stage == 0 and options.get("assembler"):
                continue  # stage 0 places as ddp: no assembler
            results = run_ranks(
                measure,
                args.world,
                stage=stage,
                steps=args.steps,
                vocab=args.vocab,
                timeout=1200,
                **options,
            )
            row[name] = {
                "step_ms": max(r["step_ms"] for r in results),
                "train_step_ms": max(r["train_step_ms"] for r in results),
                "max_state_mib": max(r["state_bytes"] for r in results) / 2**20,
                "total_state_mib": sum(r["state_bytes"] for r in results) / 2**20,
                "split_params": results[0]["split"],
                "sent_kib_per_step_max": max(r["sent_kib_per_step"] for r in results),
            }
        rows.append(row)
        adamw = row["adamw"]
        for name in [c for c in contenders if c in row]:
            m = row[name]
            print(
                f"{stage:>5} {name:>21} {m['step_ms']:>8.1f} "
                f"{m['step_ms'] / adamw['step_ms']:>8.2f} {m['train_step_ms']:>9.1f} "
                f"{m['train_step_ms'] / adamw['train_step_ms']:>8.2f} "
                f"{m['max_state_mib']:>15.2f} {m['total_state_mib']:>10.2f} "
                f"{m['split_params']:>5} {m['sent_kib_per_step_max']:>24.0f}",
                flush=True,
            )
    write_results(
        args.out,
        {"world": args.world, "block_size": args.block_size, "vocab": args.vocab, "rows": rows},
    )


if __name__ == "__main__":
    main()
