"""Scenarios for blocks with their own owners: a NaN in one piece, checkpoints across splits."""

from __future__ import annotations

import io
import math

import torch
import torch.distributed as dist
from torch import nn

from distsoap import SOAP
from tests.distributed.scenarios import OPTIONS, SHAPES
from tests.distributed.scenarios import ProblemModel as _ProblemModel

BLOCKS = {"block_size": 8}
"""Blocks of at most 8: (16, 16) as 2 x 2, (24, 24) as 3 x 3, (64, 64) as 8 x 8, and the
padded (61, 61) as 8 x 8 blocks of 8 (the last row and column of blocks 5 real of 8)."""
SPLIT_SHAPES = [(64, 64) if s == (12, 40) else s for s in SHAPES] + [(61, 61)]
"""The problem's shapes, the large (64, 64) holding about half the work: placed whole it would
leave its owner far above the mean, so ``place_blocks`` splits it (and the other parameters
above a quarter of a rank's share).

Every factored block is square and its first gradient full rank. A padded block's real part
is not square (5 x 8), and a non-square block's first basis is not unique: an 8 x 8 factor of
rank 5, whose null space eigh may return in any rotation, and SOAP's later updates depend on
that choice (Adam's per-coordinate scaling is not rotation invariant), in one process as much as
in several, so a few bits of summation order decide it. The padded (61, 61) is therefore in a
param group whose ``max_precond_dim`` (4) leaves its blocks unrotated: its blocks, padding
included, still travel and are put back together like the others, with Adam's exact math."""
FSDP_SHAPES = [(1,) if s == () else s for s in SPLIT_SHAPES]
"""The same for FSDP2, which shards no scalar."""
MERGED_SHAPES = [(64, 8, 3, 3) if len(s) == 4 else s for s in FSDP_SHAPES]
"""FSDP_SHAPES with a large conv weight: under ``merge_dims`` it is ``(64, 24, 3)``, cut into
8 x 3 blocks of ``(8, 8, 3)`` (each factor full rank from the first gradient). Its blocks are
boxes of the merged dims, not of the parameter's, so a split takes the assembler's round trip."""
PADDED = len(SPLIT_SHAPES) - 1
"""Index of the padded parameter in the problem."""
NAN_STEP, NAN_PARAM = 4, 5
"""The step and parameter (the large one) whose gradient gets one NaN element."""


class ProblemModel(_ProblemModel):
    """The regression problem on :data:`SPLIT_SHAPES`, the padded parameter in its own group."""

    def __init__(self, dtype: torch.dtype, shapes=None, skips: str = "per_rank"):
        super().__init__(dtype, SPLIT_SHAPES if shapes is None else shapes, skips)

    def param_groups(self) -> list[dict]:
        padded = list(self.blocks)[PADDED]
        groups = super().param_groups()
        groups[0]["params"] = [p for p in groups[0]["params"] if p is not padded]
        return [*groups, dict(params=[padded], max_precond_dim=4)]


def poison(grad: torch.Tensor) -> torch.Tensor:
    """The gradient with one element NaN (so NaN in one block of its average)."""
    grad = grad.clone()
    grad[0, 0] = float("nan")
    return grad


def train(
    model: ProblemModel,
    opt: SOAP,
    steps: range,
    rank: int,
    world: int,
    nan: bool = False,
    ddp: bool = False,
    data_world: int | None = None,
    nan_in_shard: bool = False,
) -> None:
    """Steps on this rank's shard of ``world``; in one process, on all ``world`` shards.

    ``data_world``: the batch is cut into that many shards, dealt round-robin to the ranks and
    weighted so that the ranks' average is the mean over the shards (a run resumed on another
    number of ranks sees the same data). ``nan_in_shard``: the last rank's reduced gradient
    shard of the poisoned parameter gets one NaN at ``NAN_STEP`` (FSDP2, whose reduction
    bypasses tensor hooks).
    """
    forward = model
    poisoned = list(model.blocks)[NAN_PARAM]
    if nan and (rank == world - 1 or not dist.is_initialized()):
        # a tensor hook changes the gradient before DDP's or zero2's hooks send it
        poisoned.register_hook(lambda g: poison(g) if model.step == NAN_STEP else g)
    if ddp:
        forward = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    for step in steps:
        model.step = step
        opt.zero_grad(set_to_none=True)
        if not dist.is_initialized():  # the full batch: the mean of every rank's shard loss
            loss = sum(model(step, r, (r, world)) for r in range(world)) / world
        elif data_world is not None and data_world != world:
            mine = range(rank, data_world, world)
            loss = sum(forward(step, k, (k, data_world)) for k in mine) * (world / data_world)
        else:
            loss = forward(step, rank, (rank, world))
        loss.backward()
        if nan_in_shard and step == NAN_STEP and rank == world - 1:
            poisoned.grad._local_tensor[0, 0] = float("nan")
        opt.step()


def single(
    world: int,
    steps: int,
    nan: bool = False,
    saved: bytes | None = None,
    start: int = 0,
    skips: str = "per_rank",
    shapes=None,
    dtype: torch.dtype = torch.float64,
    **options,
) -> dict:
    """One process on the full batch (``world``'s shards), optionally from a saved state;
    ``options`` go to SOAP."""
    model = ProblemModel(dtype, shapes, skips)
    opt = SOAP(
        model.param_groups(),
        strategy="single",
        nonfinite_grads="skip",
        **OPTIONS,
        **BLOCKS,
        **options,
    )
    if saved is not None:
        state = torch.load(io.BytesIO(saved), weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    train(model, opt, range(start, steps), 0, world, nan=nan)
    skips = opt.state[list(model.blocks)[NAN_PARAM]].get("nonfinite_skips")
    return {"params": [p.detach().clone() for p in model.parameters()], "skips": skips}


def nan_in_one_piece(rank: int, world: int, strategy: str) -> dict:
    """Data-parallel training with a NaN in one block of a split parameter at one step."""
    model = ProblemModel(torch.float64)
    opt = SOAP(model.param_groups(), strategy=strategy, nonfinite_grads="skip", **OPTIONS, **BLOCKS)
    train(model, opt, range(8), rank, world, nan=True, ddp=strategy == "ddp")
    param = list(model.blocks)[NAN_PARAM]
    owners = [p.owner for p in opt.strategy.pieces if opt.strategy.params[p.param] is param]
    state = opt.state[param]
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "owners": owners,
        "skips": state.get("nonfinite_skips") if state else None,
    }


def nan_in_one_piece_fsdp2(rank: int, world: int) -> dict:
    """FSDP2 training with a NaN in one rank's shard of a split parameter at one step."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    model = ProblemModel(torch.float64, FSDP_SHAPES, "global")
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = SOAP(model.param_groups(), strategy="fsdp2", nonfinite_grads="skip", **OPTIONS, **BLOCKS)
    train(model, opt, range(8), rank, world, nan_in_shard=True)
    strategy = opt.strategy
    index = next(i for i, p in enumerate(strategy.params) if p is list(model.blocks)[NAN_PARAM])
    state = opt.state[list(model.blocks)[NAN_PARAM]]
    return {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "owners": [p.owner for p in strategy.split.get(index, [])],
        "direct": index in strategy.direct,
        "skips": state.get("nonfinite_skips") if state else None,
    }


def save_split_then_continue(rank: int, world: int, split_at: int, steps: int) -> dict:
    """zero2 for ``split_at`` steps, then rank 0's consolidated state (bytes), then on.

    The run's own continuation to ``steps`` is what a resumed run must match.
    """
    model = ProblemModel(torch.float64)
    opt = SOAP(model.param_groups(), strategy="zero2", nonfinite_grads="skip", **OPTIONS, **BLOCKS)
    train(model, opt, range(split_at), rank, world)
    opt.consolidate_state_dict(to=0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    train(model, opt, range(split_at, steps), rank, world)
    return {
        "saved": buffer.getvalue() if rank == 0 else None,
        "params": [p.detach().clone() for p in model.parameters()],
        "split": sorted({p.param for p in opt.strategy.pieces if p.rows is not None}),
    }


def resume_split(rank: int, world: int, saved: bytes, start: int, steps: int) -> dict:
    """zero2 at ``world`` ranks resumed from a saved state dict (any placement saved it)."""
    state = torch.load(io.BytesIO(saved), weights_only=False)
    model = ProblemModel(torch.float64)
    opt = SOAP(model.param_groups(), strategy="zero2", nonfinite_grads="skip", **OPTIONS, **BLOCKS)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    train(model, opt, range(start, steps), rank, world)
    return {"params": [p.detach().clone() for p in model.parameters()]}


def saved_single(world: int, steps: int) -> bytes:
    """A single process's state after ``steps`` steps on ``world``'s shards, as bytes."""
    model = ProblemModel(torch.float64)
    opt = SOAP(model.param_groups(), strategy="single", nonfinite_grads="skip", **OPTIONS, **BLOCKS)
    train(model, opt, range(steps), 0, world)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    return buffer.getvalue()


def _drifting_on_last_rank(real, rank: int, world: int, model, at_first_call: bool):
    """``update.drifting_rows`` that reports every row of a low-precision basis as drifting on
    the last rank only, at the first call (step 0) or at the refreshes (``model.step`` > 0)."""

    def drifting_rows(bases, dtypes, tol):
        low = any(d is not None and d.itemsize < 4 for d in dtypes)
        if rank == world - 1 and low and (model.step == 0) == at_first_call:
            return list(range(next(b.shape[0] for b in bases if b is not None)))
        return real(bases, dtypes, tol)

    return drifting_rows


def drift_on_one_rank(rank: int, world: int, strategy: str, at_first_call: bool) -> dict:
    """bf16 bases; the drift guard reports a drift on the last rank only.

    ``at_first_call``: at the first eigendecomposition (step 0), else at every refresh (each
    block refreshes at least once in the 12 steps) while the bases are still bf16. Returns, per
    parameter held here, its bases' dtype and fallback count.
    """
    from distsoap.engine import update  # noqa: PLC0415 (patched here, in this rank only)

    model = ProblemModel(torch.float32)
    opt = SOAP(
        model.param_groups(),
        strategy=strategy,
        basis_dtype="bf16",
        basis_orthogonality_tol=0.05,  # the real guard never fires here (bound <= 0.01)
        **OPTIONS,
        **BLOCKS,
    )
    real = update.drifting_rows
    update.drifting_rows = _drifting_on_last_rank(real, rank, world, model, at_first_call)
    try:
        train(model, opt, range(12), rank, world, ddp=strategy == "ddp")
    finally:
        update.drifting_rows = real
    held = {}
    for index, param in enumerate(opt.strategy.params):
        state = opt.state[param]
        if state and "basis_0" in state:
            held[index] = (state["basis_0"].dtype, state.get("basis_fallbacks", 0))
    pieces = [(p.param, p.owner, p.rows) for p in opt.strategy.pieces]
    return {"held": held, "pieces": pieces}


def train_split(rank: int, world: int, strategy: str, steps: int) -> dict:
    """fp64 data-parallel training of the problem; its parameters, pieces and state bytes."""
    model = ProblemModel(torch.float64)
    opt = SOAP(model.param_groups(), strategy=strategy, **OPTIONS, **BLOCKS)
    train(model, opt, range(steps), rank, world, ddp=strategy == "ddp")
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "pieces": [(p.param, p.owner, p.rows) for p in opt.strategy.pieces],
        "split_shapes": {tuple(opt.strategy.params[i].shape) for i in opt.strategy.split},
        "state_bytes": opt.state_bytes(),
    }


def single_bytes(
    world: int,
    steps: int,
    skips: str = "per_rank",
    shapes=None,
    dtype: torch.dtype = torch.float64,
) -> int:
    """One process's SOAP state bytes after ``steps`` steps."""
    model = ProblemModel(dtype, shapes, skips)
    opt = SOAP(model.param_groups(), strategy="single", **OPTIONS, **BLOCKS)
    train(model, opt, range(steps), 0, world)
    return opt.state_bytes()


def train_split_fsdp2(
    rank: int,
    world: int,
    steps: int,
    hsdp: bool = False,
    direct: bool = True,
    shapes=FSDP_SHAPES,
    **options,
) -> dict:
    """fp64 FSDP2 training (dim 0 sharded over ``world`` ranks) with lossless SOAP.

    ``hsdp``: a ``(2, world / 2)`` mesh, replicated over its first dim (HSDP). ``direct``:
    False sends every split parameter through its assembler (in this rank's process).
    ``shapes``: the problem's; ``options`` go to SOAP.
    """
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    from distsoap.strategies.sharded import ShardedLossless  # noqa: PLC0415

    ShardedLossless.direct_exchange = direct

    model = ProblemModel(torch.float64, shapes, "global")  # FSDP2 reduces every gradient
    shape, names = ((2, world // 2), ("replicate", "shard")) if hsdp else ((world,), ("shard",))
    fully_shard(model, mesh=init_device_mesh("cpu", shape, mesh_dim_names=names))
    opt = SOAP(model.param_groups(), strategy="fsdp2", **OPTIONS, **BLOCKS, **options)
    train(model, opt, range(steps), rank, world)
    strategy = opt.strategy
    return {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "pieces": [(p.param, p.owner, p.rows) for ps in strategy.split.values() for p in ps],
        "split_shapes": {tuple(strategy.params[i].shape) for i in strategy.split},
        "owners_by_shape": {
            tuple(strategy.params[i].shape): sorted({p.owner for p in ps})
            for i, ps in strategy.split.items()
        },
        "direct": sorted(strategy.direct),
        "direct_shapes": {tuple(strategy.params[i].shape) for i in strategy.direct},
        "split": sorted(strategy.split),
        "sent": dict(opt.comm_stats["total_bytes"]),
        "state_bytes": opt.state_bytes(),
    }


def _fsdp2_model_and_optimizer(world: int, **options) -> tuple[ProblemModel, SOAP]:
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    model = ProblemModel(torch.float64, FSDP_SHAPES, "global")
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model, SOAP(model.param_groups(), strategy="fsdp2", **OPTIONS, **BLOCKS, **options)


def fsdp2_save_and_continue(
    rank: int, world: int, checkpoint: str, split_at: int, steps: int
) -> dict:
    """FSDP2 with split parameters: save with torch.distributed.checkpoint at ``split_at``."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: PLC0415

    model, opt = _fsdp2_model_and_optimizer(world)
    train(model, opt, range(split_at), rank, world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    train(model, opt, range(split_at, steps), rank, world)
    return {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "split": sorted(opt.strategy.split),
    }


def fsdp2_resume(
    rank: int, world: int, checkpoint: str, data_world: int, start: int, steps: int
) -> dict:
    """A fresh FSDP2 run on ``world`` ranks resumed from the checkpoint, on the same data."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        get_state_dict,
        set_state_dict,
    )

    model, opt = _fsdp2_model_and_optimizer(world)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, range(start, steps), rank, world, data_world=data_world)
    pieces = {i: [(p.owner, p.rows) for p in ps] for i, ps in opt.strategy.split.items()}
    return {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "pieces": pieces,
    }


ADAPTIVE = {"refresh_tolerance": 1e-12, "max_skipped_refreshes": 2}
"""A tolerance no real mass is below: a block skips only where the mass is made 0."""


def _zero_masses(factors, bases, products):
    """Every row's off-diagonal mass reads 0: its bases still diagonalise it."""
    return torch.zeros(next(b for b in bases if b is not None).shape[0], dtype=torch.float64)


def adaptive_split(rank: int, world: int, strategy: str, zero_on: str) -> dict:
    """Adaptive refresh; the masses read 0 on the last rank only or on every rank.

    Returns the parameters and, per parameter held here, its ``skipped_refreshes``.
    """
    # imported here, in the ranks only: torch.utils.flop_counter imports Triton, which must
    # not load in pytest's own process before tests/kernels/conftest.py sets TRITON_INTERPRET
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    from distsoap.engine import update  # noqa: PLC0415 (patched here, in this rank only)

    if strategy == "fsdp2":
        model, opt = _fsdp2_model_and_optimizer(world, **ADAPTIVE)
    else:
        model = ProblemModel(torch.float64)
        opt = SOAP(model.param_groups(), strategy=strategy, **OPTIONS, **BLOCKS, **ADAPTIVE)
    real = update.off_diagonal_mass_of_products
    if zero_on == "every_rank" or rank == world - 1:
        update.off_diagonal_mass_of_products = _zero_masses
    finish, refresh_flops = opt.engine.finish_refreshes, []

    def counted_finish():  # every matmul of the refreshes (and of the skip tests)
        with FlopCounterMode(display=False) as counter:
            finish()
        refresh_flops.append(counter.get_total_flops())

    opt.engine.finish_refreshes = counted_finish
    try:
        train(model, opt, range(12), rank, world, ddp=strategy == "ddp")
    finally:
        update.off_diagonal_mass_of_products = real
    # per skipped refresh, GG Q once per factor of the blocks held: (d, d) or (rows, d, d)
    # bases, 2 d^3 per matrix
    product_flops = sum(
        state.get("skipped_refreshes", 0) * 2 * math.prod(b.shape[:-2]) * b.shape[-1] ** 3
        for state in opt.state.values()
        for key, b in state.items()
        if key.startswith("basis_") and torch.is_tensor(b)
    )
    skipped = {
        index: opt.state[p].get("skipped_refreshes", 0)
        for index, p in enumerate(opt.strategy.params)
        if opt.state[p] and "basis_0" in opt.state[p]
    }
    if strategy == "fsdp2":
        pieces = [(p.param, p.owner, p.rows) for ps in opt.strategy.split.values() for p in ps]
        pieces += [
            (i, o, None) for i, o in enumerate(opt.strategy.owners) if i not in opt.strategy.split
        ]
        params = [p.full_tensor().detach().clone() for p in model.parameters()]
    else:
        pieces = [(p.param, p.owner, p.rows) for p in opt.strategy.pieces]
        params = [p.detach().clone() for p in model.parameters()]
    return {
        "params": params,
        "skipped": skipped,
        "pieces": pieces,
        "refresh_flops": sum(refresh_flops),
        "product_flops": product_flops,
    }


def single_adaptive(world: int, steps: int, zero_masses: bool, fsdp2: bool = False) -> dict:
    """One process with the adaptive refresh, the masses optionally all read 0."""
    from distsoap.engine import update  # noqa: PLC0415

    model = ProblemModel(torch.float64, *((FSDP_SHAPES, "global") if fsdp2 else ()))
    opt = SOAP(model.param_groups(), strategy="single", **OPTIONS, **BLOCKS, **ADAPTIVE)
    real = update.off_diagonal_mass_of_products
    if zero_masses:
        update.off_diagonal_mass_of_products = _zero_masses
    try:
        train(model, opt, range(steps), 0, world)
    finally:
        update.off_diagonal_mass_of_products = real
    skipped = sum(s.get("skipped_refreshes", 0) for s in opt.state.values())
    return {"params": [p.detach().clone() for p in model.parameters()], "skipped": skipped}


def train_split_fsdp1(rank: int, world: int, steps: int, shapes=FSDP_SHAPES, **options) -> dict:
    """fp64 FSDP1 (``use_orig_params``) training with lossless SOAP, every block stepped.

    ``shapes``: the problem's; ``options`` go to SOAP.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: PLC0415

    # FSDP1 hands an unused parameter a zero gradient, not None: no skipped blocks here
    model = ProblemModel(torch.float64, shapes, "none")
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    opt = SOAP(
        model.param_groups(),
        strategy="fsdp1",
        fsdp_model=wrapped,
        **OPTIONS,
        **BLOCKS,
        **options,
    )
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        wrapped(step, rank, (rank, world)).backward()
        opt.step()
    with FullyShardedDataParallel.summon_full_params(wrapped):
        params = [p.detach().clone() for p in model.parameters()]
    strategy = opt.strategy
    whole = [tuple(layout.full_shape) for layout in strategy.layouts]  # params are flat views
    return {
        "params": params,
        "pieces": [(p.param, p.owner, p.rows) for ps in strategy.split.values() for p in ps],
        "owners_by_shape": {
            whole[i]: sorted({p.owner for p in ps}) for i, ps in strategy.split.items()
        },
        "direct": sorted(strategy.direct),
        "direct_shapes": {whole[i] for i in strategy.direct},
        "split": sorted(strategy.split),
        "sent": dict(opt.comm_stats["total_bytes"]),
        # whether some rank's flat range of a split parameter ends inside one of its rows
        "cut_inside_rows": any(
            stop % strategy.layouts[i].full_shape[-1] != 0
            for i in strategy.split
            for _, stop in strategy.layouts[i].ranges
        ),
    }


def _deepspeed_engine(rank: int, world: int, stage: int, **options):
    """A DeepSpeed ZeRO ``stage`` engine over a fresh fp32 problem, SOAP with blocks of 8."""
    from tests.distributed.deepspeed_scenarios import build_engine, ds_config  # noqa: PLC0415

    config = ds_config(stage, world=world)
    config["optimizer"]["params"].update(BLOCKS, **options)
    model = ProblemModel(torch.float32, FSDP_SHAPES, "none")  # DeepSpeed: zero gradients
    return build_engine(rank, world, config, model=model)


def deepspeed_save_and_resume(rank: int, world: int, stage: int, path: str) -> dict:
    """12 steps with DeepSpeed's ``save_checkpoint`` at step 6; a fresh engine loads it and
    takes the last 6 steps again. Returns both runs' parameters and whether any was split."""
    from tests.distributed.deepspeed_scenarios import full_params  # noqa: PLC0415

    model, engine = _deepspeed_engine(rank, world, stage)
    for step in range(12):
        if step == 6:
            engine.save_checkpoint(path, tag="step_6")
        engine.backward(engine(step, rank, (rank, world)))
        engine.step()
    straight = full_params(engine, model)
    split = bool(engine.basic_optimizer.strategy.split)
    model, engine = _deepspeed_engine(rank, world, stage)
    engine.load_checkpoint(path, tag="step_6")
    for step in range(6, 12):
        engine.backward(engine(step, rank, (rank, world)))
        engine.step()
    return {"straight": straight, "resumed": full_params(engine, model), "split": split}


def train_split_deepspeed(
    rank: int, world: int, stage: int, steps: int, drift_at_first_call: bool | None = None
) -> dict:
    """fp32 DeepSpeed ZeRO ``stage`` training of the problem (every parameter gets a gradient).

    DeepSpeed steps one param group per ``step()`` call at stages 1 and 2, and the problem has
    three, so a split parameter's owners agree within its own group's call.
    ``drift_at_first_call``: None, or bf16 bases with the drift guard made to fire on the last
    rank only, as in :func:`drift_on_one_rank` (at the first call, or at every refresh).
    """
    from distsoap.engine import update  # noqa: PLC0415 (patched here, in this rank only)
    from tests.distributed.deepspeed_scenarios import full_params  # noqa: PLC0415

    extra = {}
    if drift_at_first_call is not None:
        extra = dict(basis_dtype="bf16", basis_orthogonality_tol=0.05)
    model, engine = _deepspeed_engine(rank, world, stage, **extra)
    soap = engine.basic_optimizer
    real = update.drifting_rows
    if drift_at_first_call is not None:
        patched = _drifting_on_last_rank(real, rank, world, model, drift_at_first_call)
        update.drifting_rows = patched
    try:
        for step in range(steps):
            model.step = step
            engine.backward(engine(step, rank, (rank, world)))
            engine.step()
    finally:
        update.drifting_rows = real
    strategy = soap.strategy
    held = {}
    with strategy.model_view():
        for index, param in enumerate(strategy.params):
            state = soap.state[param]
            if state and "basis_0" in state:
                held[index] = (state["basis_0"].dtype, state.get("basis_fallbacks", 0))
    pieces = [(p.param, p.owner, p.rows) for ps in strategy.split.values() for p in ps]
    pieces += [(i, o, None) for i, o in enumerate(strategy.owners) if i not in strategy.split]
    return {
        "strategy": strategy.name,
        "params": full_params(engine, model),
        "pieces": sorted(pieces, key=lambda p: (p[0], p[1])),
        "split_shapes": {tuple(strategy.layouts[i].full_shape) for i in strategy.split},
        "direct": sorted(strategy.direct),
        "split": sorted(strategy.split),
        "sent": dict(soap.comm_stats["total_bytes"]),
        "state_bytes": soap.state_bytes(),
        "held": held,
    }
