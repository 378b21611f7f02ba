"""What each rank runs in the DeepSpeed tests (importable by spawned processes).

The model is tests/distributed/scenarios.py's ProblemModel (mixed shapes, two param groups, a
frozen and an unused parameter). DeepSpeed hands parameters that got no gradient a zero
gradient (at ZeRO >= 1, and in its stage-0 all-reduce), where single-process SOAP skips them, so
no block is skipped in these runs (``skips="none"``); the unused parameter still is, and a zero
gradient leaves it where single-process SOAP leaves it (its group has no weight decay).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tests.distributed.scenarios import OPTIONS, ProblemModel

# no 0-d parameter: DeepSpeed cannot broadcast one (it views every parameter as bytes)
DS_SHAPES = [(16, 16), (16, 16), (3, 3), (24, 24), (8, 6, 3, 3), (12, 40), (37,), (5,), (1,)]


def ds_config(
    stage: int,
    precision: str = "fp32",
    accumulate: int = 1,
    clip: float = 0.0,
    world: int = 2,
    extra: dict | None = None,
) -> dict:
    """A DeepSpeed config with ``"type": "SOAP"``."""
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulate,
        "train_batch_size": accumulate * world,
        "optimizer": {"type": "SOAP", "params": dict(OPTIONS)},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    if precision == "fp16":  # dynamic loss scaling from 2^4: no overflow on this problem
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 4}
    config.update(extra or {})
    return config


def allow_cpu_fp16() -> None:
    """Let DeepSpeed's CPU accelerator run fp16.

    It offers fp16 only where oneDNN has fp16 instructions (this machine's CPU has none); torch's
    CPU fp16 arithmetic is correct without them, only slower, so the fp16 tests lift the gate to
    run DeepSpeed's real fp16 wrappers and dynamic loss scaler.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: True


def build_engine(
    rank: int, world: int, config: dict, entry: str = "wrapper", model: torch.nn.Module = None
):
    """A DeepSpeed engine over ``model`` (default: a fresh fp32 ProblemModel on DS_SHAPES).

    ``entry``: how SOAP gets in.
    """
    if config.get("fp16", {}).get("enabled"):
        allow_cpu_fp16()
    if model is None:
        model = ProblemModel(torch.float32, DS_SHAPES, skips="none")
    groups = model.param_groups()
    if entry == "wrapper":
        from distsoap.integrations.deepspeed import initialize
    else:  # plain deepspeed.initialize after importing the integration (HF Trainer's path)
        import deepspeed

        import distsoap.integrations.deepspeed  # noqa: F401

        initialize = deepspeed.initialize
    if entry == "client":  # an optimizer object instead of the JSON "optimizer" section
        from distsoap import SOAP

        config = {k: v for k, v in config.items() if k != "optimizer"}
        engine, *_ = initialize(model=model, optimizer=SOAP(groups, **OPTIONS), config=config)
    else:
        engine, *_ = initialize(model=model, model_parameters=groups, config=config)
    return model, engine


def full_params(engine, model) -> list[torch.Tensor]:
    """Every parameter, whole, in fp32 (gathered from ZeRO-3's partitions)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return [p.detach().float().clone() for p in model.parameters()]
    return [p.detach().float().clone() for p in model.parameters()]


def master_params(engine, model) -> list[torch.Tensor]:
    """DeepSpeed's fp32 master weights (what the optimizer updates), whole."""
    from deepspeed.utils import safe_get_full_fp32_param

    if engine.zero_optimization_stage() in (0, 3):  # stage 3: the gathered parameters
        return full_params(engine, model)
    out = []
    for p in model.parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        out.append(p.detach().float().clone() if full is None else full.detach().clone())
    return out


def train_deepspeed(
    rank: int,
    world: int,
    config: dict,
    steps: int,
    entry: str = "wrapper",
    inf_at_step: int | None = None,
) -> dict:
    """Train ``steps`` optimizer steps; each rank scores its micro-batch shards."""
    model, engine = build_engine(rank, world, config, entry)
    accumulate = config.get("gradient_accumulation_steps", 1)
    soap = engine.basic_optimizer
    unchanged = None
    for step in range(steps):
        before = _state_copy(soap) if step == inf_at_step else None
        for micro in range(accumulate):
            shard = (rank * accumulate + micro, world * accumulate)
            loss = engine(step, rank, shard)
            if step == inf_at_step:
                loss = loss * float("inf")
            engine.backward(loss)
            engine.step()
        if before is not None:
            unchanged = _same_state(before, _state_copy(soap))
    result = {
        "params": full_params(engine, model),
        "master": master_params(engine, model),
        "strategy": soap.strategy.name,
        "wrapper": type(engine.optimizer).__name__,
        "state_bytes": soap.state_bytes(),
        "skipped_steps": engine.skipped_steps,
        "comm_stats": soap.comm_stats,
    }
    if unchanged is not None:
        result["state_unchanged"] = unchanged
    return result


def _state_copy(soap) -> dict:
    return {
        id(k): {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
        for k, s in soap.state.items()
    }


def _same_state(before: dict, after: dict) -> bool:
    if before.keys() != after.keys():
        return False
    for key, state in before.items():
        other = after[key]
        if state.keys() != other.keys():
            return False
        for name, value in state.items():
            same = (
                torch.equal(value, other[name]) if torch.is_tensor(value) else value == other[name]
            )
            if not same:
                return False
    return True


def save_and_resume(rank: int, world: int, config: dict, steps: int, split: int, path: str):
    """Train ``split`` steps, save, train on; a fresh engine loads and trains the same steps."""
    model, engine = build_engine(rank, world, config)
    for step in range(steps):
        if step == split:
            engine.save_checkpoint(path, tag="split")
        engine.backward(engine(step, rank, (rank, world)))
        engine.step()
    straight = full_params(engine, model)
    model2, engine2 = build_engine(rank, world, config)
    engine2.load_checkpoint(path, tag="split")
    for step in range(split, steps):
        engine2.backward(engine2(step, rank, (rank, world)))
        engine2.step()
    resumed = full_params(engine2, model2)
    return {
        "straight": straight,
        "resumed": resumed,
        "files": sorted(os.listdir(Path(path, "split"))),
    }


def clipped_reference(world: int, max_norm: float, steps: int, accumulate: int = 1) -> list:
    """Single process, full batch, torch's clip_grad_norm_ (what DeepSpeed's clipping does)."""
    from distsoap import SOAP

    model = ProblemModel(torch.float32, DS_SHAPES, skips="none")
    opt = SOAP(model.param_groups(), strategy="single", **OPTIONS)
    shards = world * accumulate
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        (sum(model(step, r, (r, shards)) for r in range(shards)) / shards).backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


class ManyBlocks(torch.nn.Module):
    """A GPT-shaped stack of many parameters; the loss is a random linear form of each."""

    def __init__(self, d: int = 32):
        super().__init__()
        shapes = [(128, d)] + [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)] * 6
        gen = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
        )

    def forward(self, seed: int) -> torch.Tensor:
        # through forward, so ZeRO-3 gathers the parameters
        data = torch.Generator().manual_seed(seed)
        return sum((p * torch.randn(p.shape, generator=data)).sum() for p in self.weights)


def state_balance(rank: int, world: int, stage: int) -> dict:
    """Many blocks under ZeRO ``stage``: per-rank SOAP state bytes after two steps."""
    from distsoap.integrations.deepspeed import initialize

    model = ManyBlocks()
    engine, *_ = initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(stage, world=world)
    )
    for step in range(2):
        engine.backward(engine(step * 10 + rank))
        engine.step()
    return {"state_bytes": engine.basic_optimizer.state_bytes()}


def gpt_stage3(rank: int, world: int, zero_init: bool, steps: int) -> list[torch.Tensor]:
    """The demo GPT under ZeRO-3, built inside ``deepspeed.zero.Init`` or not (HF's path).

    Under zero.Init the parameters are partitioned as they are created, so SOAP is built on
    empty-looking parameters. Both runs start from the same weights, written after
    construction (zero.Init's own initialisation draws differently).
    """
    import deepspeed

    from distsoap.demo.model import GPT, GPTConfig
    from distsoap.integrations.deepspeed import initialize

    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "SOAP", "params": {"lr": 3e-3, "precondition_frequency": 3}},
        "zero_optimization": {"stage": 3},
    }
    shape = GPTConfig(context=16, n_layers=1, d_model=32, n_heads=2)
    if zero_init:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = GPT(shape)
    else:
        model = GPT(shape)
    weights = torch.Generator().manual_seed(123)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        for p in model.parameters():
            p.data.copy_(torch.randn(p.shape, generator=weights) * 0.05)
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=config)
    data = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        tokens = torch.randint(0, 256, (2, 16), generator=data)
        _, loss = engine(tokens, tokens)
        engine.backward(loss)
        engine.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return [p.detach().clone() for p in model.parameters()]
