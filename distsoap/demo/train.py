"""One training run of the demo model: warm-up then cosine schedule, clipping, periodic eval."""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from distsoap import SOAP
from distsoap.demo.checkpointing import RunCheckpoints
from distsoap.demo.corpus import ByteBatches
from distsoap.demo.deepspeed_engine import deepspeed_engine
from distsoap.demo.model import GPT
from distsoap.demo.parallel import SOAP_STRATEGY, wrap_model


@dataclass
class RunConfig:
    """Settings of one training run."""

    optimizer: str
    """``"soap"`` or ``"adamw"``."""
    lr: float
    """Peak learning rate."""
    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per step."""
    warmup_fraction: float = 0.05
    """Share of the steps spent warming the lr up linearly; then cosine decay to 0."""
    clip: float = 1.0
    """Gradient-norm clipping threshold (both optimizers)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (both optimizers)."""
    precondition_frequency: int = 10
    """SOAP's eigenbasis refresh interval."""
    eval_every: int = 20
    """Evaluate the validation loss every this many steps."""
    eval_batches: int = 4
    """Validation batches per evaluation (the same batches every time)."""
    checkpoint_dir: Path | None = None
    """Save checkpoints here (one folder per optimizer) and resume from the newest."""
    checkpoint_every: int = 50
    """Steps between checkpoints."""
    fail_at_step: int | None = None
    """For testing restarts: the last rank kills itself (SIGKILL) after this step, on the first
    attempt only (torchrun's TORCHELASTIC_RESTART_COUNT is 0 or unset)."""
    seed: int = 0
    """Seeds the data order (the model is initialised by the caller)."""
    strategy: str = "single"
    """``single``, ``ddp`` (DDP-wrapped model, sharded SOAP), ``zero2`` (no wrapper; SOAP
    synchronises gradients), ``fsdp2`` / ``hsdp`` (FSDP2 on a 1-D / 2-D mesh, lossless SOAP) or
    ``fsdp2_local`` (FSDP2, SOAP on local shards). See :mod:`distsoap.demo.parallel`."""


@dataclass
class RunResult:
    """What a run measured."""

    name: str
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    optimizer_seconds: float = 0.0
    comm_bytes_per_step: dict[str, int] = field(default_factory=dict)


def make_optimizer(name: str, model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """SOAP with the reference's betas, or AdamW with the usual LM betas."""
    if name == "soap":
        return SOAP(
            model.parameters(),
            lr=cfg.lr,
            betas=(0.95, 0.95),
            weight_decay=cfg.weight_decay,
            precondition_frequency=cfg.precondition_frequency,
            strategy=SOAP_STRATEGY[cfg.strategy],
        )
    if name == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
        )
    raise ValueError(f"optimizer must be 'soap' or 'adamw', got {name!r}")


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean validation loss over fixed batches."""
    model.eval()
    losses = [float(model(x, y)[1]) for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def train_run(
    model: GPT,
    data: ByteBatches,
    cfg: RunConfig,
    device: torch.device,
    progress=None,
) -> RunResult:
    """Train ``model`` in place and return the losses and timings.

    Distributed (a process group is up and ``cfg.strategy`` is not ``single``): every rank
    draws the same global batch and trains on its slice, so the run sees the same data as a
    single process with the same batch size.

    Args:
        model: the model, already initialised and on ``device``.
        data: the corpus batches.
        cfg: run settings.
        device: where to compute.
        progress: an optional tqdm-like bar (``update`` and ``set_postfix`` are called).

    """
    rank, world = 0, 1
    distributed = cfg.strategy != "single" and dist.is_initialized()
    if distributed:
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.batch_size % world:
            raise ValueError(f"batch size {cfg.batch_size} must divide by world size {world}")
    forward = wrap_model(model, cfg.strategy, cfg.optimizer, device)
    optimizer = make_optimizer(cfg.optimizer, model, cfg)
    own_sync = isinstance(optimizer, SOAP) and optimizer.strategy.name == "zero2"
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_fraction)
    )
    engine = None
    if cfg.strategy == "deepspeed":
        if cfg.checkpoint_dir is not None:
            raise ValueError("the demo's checkpoints do not cover --strategy deepspeed")
        engine = deepspeed_engine(model, optimizer, scheduler, cfg.batch_size // world, cfg.clip)
        forward = engine
    train_gen = torch.Generator().manual_seed(cfg.seed)
    val_gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    val_batches = [
        tuple(t.to(device) for t in data.batch("val", cfg.batch_size, val_gen))
        for _ in range(cfg.eval_batches)
    ]
    result = RunResult(cfg.optimizer)
    root = cfg.checkpoint_dir / cfg.optimizer if cfg.checkpoint_dir is not None else None
    checkpoints = RunCheckpoints(root, cfg.checkpoint_every)
    finished = checkpoints.finished()
    if finished is not None:
        return RunResult(**finished)
    first = checkpoints.restore(forward, optimizer, scheduler, train_gen, result)
    if progress is not None and first:
        progress.update(first)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter() - result.wall_seconds
    share = cfg.batch_size // world
    for step in range(first, cfg.steps):
        x, y = data.batch("train", cfg.batch_size, train_gen)
        x, y = (t[rank * share : (rank + 1) * share].to(device) for t in (x, y))
        _, loss = forward(x, y)
        if engine is not None:  # DeepSpeed clips, steps the optimizer and the schedule
            engine.backward(loss)
            sync()
            opt_start = time.perf_counter()
            engine.step()
            sync()
            result.optimizer_seconds += time.perf_counter() - opt_start
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if own_sync:
                optimizer.clip_grad_norm_(cfg.clip)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            sync()
            opt_start = time.perf_counter()
            optimizer.step()
            sync()
            result.optimizer_seconds += time.perf_counter() - opt_start
            scheduler.step()
        if distributed:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        result.train_loss.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            result.eval_steps.append(step + 1)
            result.val_loss.append(evaluate(model, val_batches))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{result.train_loss[-1]:.3f}", refresh=False)
        result.wall_seconds = time.perf_counter() - start
        if isinstance(optimizer, SOAP):
            result.comm_bytes_per_step = dict(optimizer.comm_stats["last_step_bytes"])
        checkpoints.maybe_save(forward, optimizer, scheduler, train_gen, result, step + 1)
        if step + 1 == cfg.fail_at_step:
            simulate_failure(rank, world)
    checkpoints.mark_finished(result)
    return result


def simulate_failure(rank: int, world: int) -> None:
    """Kill the last rank with SIGKILL, on a job's first attempt only (see RunConfig)."""
    if rank == world - 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


def steps_to_reach(result: RunResult, target: float) -> int | None:
    """The first evaluation step whose validation loss is <= ``target`` (None if never)."""
    for step, loss in zip(result.eval_steps, result.val_loss):
        if loss <= target:
            return step
    return None
