"""What each rank runs in the torchtitan llama3 test (importable by the worker processes).

torchtitan's own components, driven as its ``Trainer`` drives them (torchtitan/trainer.py:
``__init__`` builds them, ``train_step`` trains, ``train`` loads and saves). The trainer itself
needs CUDA and torchtitan's data and logging requirements, so this module stands in for it:

- model: the llama3 ``debugmodel`` of torchtitan's model registry (dim 256, 16 heads, vocab
  2048) with its 6 layers cut to 2, built on the meta device, parallelized by torchtitan's
  ``parallelize_llama`` (tensor parallelism with sequence parallelism, then FSDP2 over the
  ``fsdp`` axis of torchtitan's ``ParallelDims``), then ``to_empty`` and ``init_weights``;
- optimizer: torchtitan's ``OptimizersContainer`` from
  ``distsoap.integrations.torchtitan.default_soap`` (``optimizer_name="SOAP"``), and
  torchtitan's ``LRSchedulersContainer`` with the debug config's warmup and linear decay;
- step: torchtitan's cross-entropy loss over the global count of valid tokens, its
  ``clip_grad_norm_``, then the containers' ``step()``;
- checkpoints: torchtitan's ``CheckpointManager`` (DCP) saves and loads the model (its
  ``ModelWrapper``), the optimizer container, the lr schedulers, the data position and the
  train state, on the trainer's schedule (``save(step)`` after every step; it writes every
  ``interval`` steps and at the last).

Where it differs from the trainer, each forced by CPU, gloo, or the requirements left out
(datasets, torchdata, tensorboard; see scripts/setup_env.sh):

- attention: torchtitan's ``ScaledDotProductAttention`` (causal) in the model config's
  ``inner_attention`` in place of FlexAttention ("FlexAttention does not support backward on
  CPU"; torchtitan's ``post_dataloading_process`` supports this maskless backend);
- ``ParallelDims`` builds its meshes on ``torchtitan.tools.utils.device_type``, which is
  ``"cuda"`` wherever no accelerator is found; set to ``"cpu"`` here;
- ``spmd_backend="partial_dtensor"``: with this torch the default ``"spmd_types"`` stops in
  ``fully_shard`` ("When dp_mesh_dims is provided, all parameters must be DTensors on the full
  SPMD mesh"); the DTensor path gives SOAP the tensor-parallel shards as DTensors;
- FSDP reduces with a sum (``set_force_sum_reduction_for_comms``): torchtitan sets a gradient
  divide factor of 1, which FSDP sends as ``PREMUL_SUM(1.0)``, an op gloo lacks;
- ``Llama3Model.Config.update_from_config`` imports torchtitan's trainer module (torchdata), so
  its two effects here are applied directly: torchtitan's llama3 sharding config, and the RoPE
  cache cut to the training sequence length;
- data: :class:`SyntheticTokens` stands in for torchtitan's dataloader (same ``(input_dict,
  labels)`` items, checkpointed under its ``"dataloader"`` key); fp32 in the forward
  (``mixed_precision_param="float32"``, a torchtitan option) rather than bf16.

Each step's global batch is fixed by the step index and split evenly over the data-parallel
ranks, so every (dp, tp) split trains on the same objective. Workers return numbers, not
parameters: four ranks' copies of a dozen snapshots would be hundreds of MB of pickles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

SEQ_LEN = 32
GLOBAL_BATCH = 4
N_LAYERS = 2  # of the debug model's 6; its dims, heads and vocab are kept
STEPS = 6
SAVE_AT = 3
LR = 3e-3
PRECONDITION_FREQUENCY = 2  # eigenbases refreshed on both sides of the checkpoint


class SyntheticTokens:
    """Stands in for torchtitan's dataloader: ``(input_dict, labels)`` per step, stateful.

    Step ``s``'s global batch is ``GLOBAL_BATCH`` runs of consecutive token ids (a next-token
    rule the model can learn) from starts drawn with seed ``s``; data-parallel rank ``r`` of
    ``dp`` takes chunk ``r`` of its rows.
    """

    def __init__(self, vocab_size: int, dp: int, dp_rank: int) -> None:
        self.vocab_size, self.dp, self.dp_rank = vocab_size, dp, dp_rank
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        generator = torch.Generator().manual_seed(1000 + self.step)
        self.step += 1
        starts = torch.randint(0, self.vocab_size, (GLOBAL_BATCH, 1), generator=generator)
        tokens = (starts + torch.arange(SEQ_LEN + 1)) % self.vocab_size
        mine = tokens.chunk(self.dp)[self.dp_rank]
        return {"input": mine[:, :-1]}, mine[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]


class TrainState:
    """What the trainer checkpoints of itself (``Trainer.state_dict``)."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self.ntokens_seen = state_dict["ntokens_seen"]


@dataclasses.dataclass
class Run:
    """A trainer's torchtitan components on one (dp, tp) split."""

    model: torch.nn.Module
    optimizers: Any
    lr_schedulers: Any
    checkpointer: Any
    data: SyntheticTokens
    train_state: TrainState
    parallel_dims: Any
    loss_fn: Any
    train_context: Any
    losses: list[float] = dataclasses.field(default_factory=list)


def _model_config(parallelism):
    """torchtitan's llama3 debug model config: SDPA, fewer layers, sharding specs set."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import model_registry
    from torchtitan.models.llama3.sharding import set_llama3_sharding_config

    spec = model_registry("debugmodel")
    config = spec.model
    config.layers = config.layers[:N_LAYERS]
    for layer in config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        # what Decoder.Config.update_from_config does with training.seq_len
        layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=SEQ_LEN)
    set_llama3_sharding_config(config, enable_sp=parallelism.enable_sequence_parallel)
    return spec, config


def build(
    world: int,
    dp: int,
    tp: int,
    folder: str,
    exclude_from_loading: tuple[str, ...] = (),
) -> Run:
    """torchtitan's components on a ``(dp, tp)`` split, as ``Trainer.__init__`` builds them."""
    import torch.distributed as dist
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.optimizer import LRSchedulersContainer
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils

    from distsoap.integrations.torchtitan import default_soap

    parallel_dims_module.device_type = "cpu"  # "cuda" wherever torchtitan finds no accelerator
    parallelism = ParallelismConfig(
        data_parallel_shard_degree=dp, tensor_parallel_degree=tp, spmd_backend="partial_dtensor"
    )
    training = TrainingConfig(
        local_batch_size=GLOBAL_BATCH // dp,
        seq_len=SEQ_LEN,
        steps=STEPS,
        mixed_precision_param="float32",
    )
    dist_utils.set_spmd_backend(parallelism.spmd_backend)
    parallel_dims = ParallelDims.from_config(parallelism, world)
    parallel_dims.build_mesh()
    spec, model_config = _model_config(parallelism)
    with torch.device("meta"):
        model = model_config.build()
    model = spec.parallelize_fn(
        model,
        parallel_dims=parallel_dims,
        training=training,
        parallelism=parallelism,
        compile_config=CompileConfig(),  # torch.compile off, its default
        ac_config=None,  # no activation checkpointing
        dump_folder=folder,
    )
    for module in model.modules():
        if isinstance(module, FSDPModule):  # gloo has no PREMUL_SUM (module docstring)
            module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()

    optimizers = default_soap(lr=LR, precondition_frequency=PRECONDITION_FREQUENCY).build(
        model_parts=[model]
    )
    lr_schedulers = LRSchedulersContainer.Config(
        warmup_steps=2, decay_ratio=0.8, decay_type="linear", min_lr_factor=0.0
    ).build(optimizers=optimizers, training_steps=STEPS)
    batch_rank = parallel_dims.get_mesh("batch").get_local_rank() if parallel_dims.dp_enabled else 0
    data = SyntheticTokens(model_config.vocab_size, dp, batch_rank)
    train_state = TrainState()
    checkpointer = CheckpointManager.Config(
        enable=True,
        folder="checkpoint",
        interval=SAVE_AT,
        keep_latest_k=0,
        last_save_model_only=False,
        exclude_from_loading=list(exclude_from_loading),
    ).build(
        dataloader=data,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={"train_state": train_state},
        sd_adapter=None,
        base_folder=folder,
    )
    dist.barrier()
    return Run(
        model=model,
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        checkpointer=checkpointer,
        data=data,
        train_state=train_state,
        parallel_dims=parallel_dims,
        loss_fn=CrossEntropyLoss.Config(global_vocab_size=model_config.vocab_size).build(),
        train_context=dist_utils.get_spmd_context(parallel_dims=parallel_dims),
    )


def train_step(run: Run) -> None:
    """``Trainer.train_step`` with no gradient accumulation or pipeline; records the loss."""
    from torchtitan.components.loss import IGNORE_INDEX
    from torchtitan.distributed import utils as dist_utils

    parallel_dims = run.parallel_dims
    run.optimizers.zero_grad(set_to_none=True)
    input_dict, labels = next(run.data)
    local_valid_tokens = (labels != IGNORE_INDEX).sum()
    global_valid_tokens = (
        dist_utils.dist_sum_tensor(local_valid_tokens, parallel_dims.get_mesh("batch"))
        if parallel_dims.dp_enabled
        else local_valid_tokens
    )
    run.train_state.ntokens_seen += labels.numel()
    with run.train_context():
        pred = run.model(input_dict["input"])
        loss, _ = run.loss_fn(pred, labels, global_valid_tokens)
        del pred
        loss.backward()
    dist_utils.clip_grad_norm_(list(run.model.parameters()), 1.0, foreach=True)
    run.checkpointer.maybe_wait_for_staging()
    run.optimizers.step()
    run.lr_schedulers.step()
    run.losses.append(
        dist_utils.dist_sum(loss.detach(), parallel_dims.get_mesh("loss"))
        if parallel_dims.dp_cp_enabled
        else loss.item()
    )


def train(run: Run, until: int) -> None:
    """``Trainer.train``'s loop up to step ``until``: a step, then the checkpointer's save."""
    while run.train_state.step < until:
        run.train_state.step += 1
        train_step(run)
        run.checkpointer.save(run.train_state.step, last_step=run.train_state.step == STEPS)


def full_parameters(run: Run) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in run.model.named_parameters()}


def soap_state_is_fresh(run: Run) -> bool:
    """No step counted, no basis computed, moments and factors zero."""
    (soap,) = run.optimizers.optimizers
    for state in soap.state.values():
        for key, value in state.items():
            if key == "bases_ready" and value:
                return False
            if key == "step" and int(value) != 0:
                return False
            if key.startswith(("exp_avg", "factor_")) and torch.is_tensor(value):
                local = value.to_local() if hasattr(value, "to_local") else value
                if local.count_nonzero() != 0:
                    return False
    return True


def compare(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Whether ``got`` is ``want`` bit for bit, and each parameter's distance to it relative to
    the way ``want`` moved from ``start``."""
    distance = {}
    for name in want:
        off, moved = (got[name] - want[name]).norm().item(), (want[name] - start[name]).norm()
        distance[name] = off / moved.item() if moved > 0 else (0.0 if off == 0 else math.inf)
    return dict(
        bit_identical=all(torch.equal(got[n], want[n]) for n in want), relative_distance=distance
    )


def save_and_resume(
    rank: int, world: int, folder: str, resume_splits: list[tuple[int, int]]
) -> dict:
    """Train STEPS on (2, 2), a checkpoint at SAVE_AT, then resume from it on each split.

    Also on (2, 2): the first run takes torchtitan's ``init_optim_state`` step before training
    (what the container's ``state_dict()`` does when saved before any step); a second one,
    without it, must reach SAVE_AT bit for bit the same. And a control resume with the
    optimizer left out of the load (``exclude_from_loading``), which must not end where the
    uninterrupted run does: the comparisons can fail.
    """
    run = build(world, 2, 2, f"{folder}/main")
    (soap,) = run.optimizers.optimizers
    initial = full_parameters(run)
    run.optimizers.state_dict()  # torchtitan's init_optim_state: a zero-gradient, lr=0 step
    result: dict[str, Any] = dict(
        optimizer_type=type(soap).__name__,
        init_step_leaves_parameters=compare(full_parameters(run), initial, initial)[
            "bit_identical"
        ],
        init_step_state_entries=len(soap.state),
        init_step_state_fresh=soap_state_is_fresh(run),
    )
    assert not run.checkpointer.load()  # Trainer.train begins with a load: a fresh start
    train(run, SAVE_AT)
    at_save = full_parameters(run)
    train(run, STEPS)
    uninterrupted = full_parameters(run)
    result["uninterrupted_losses"] = run.losses
    run.checkpointer.close()

    no_init_step = build(world, 2, 2, f"{folder}/no_init_step")
    train(no_init_step, SAVE_AT)
    result["without_init_step"] = compare(full_parameters(no_init_step), at_save, initial)
    no_init_step.checkpointer.close()

    def resume(dp: int, tp: int, exclude_from_loading: tuple[str, ...] = ()) -> dict:
        resumed = build(world, dp, tp, f"{folder}/main", exclude_from_loading)
        assert resumed.checkpointer.load(step=SAVE_AT)  # --checkpoint.load_step
        assert resumed.train_state.step == SAVE_AT and resumed.data.step == SAVE_AT
        train(resumed, STEPS)
        resumed.checkpointer.close()
        return dict(
            split=(dp, tp),
            losses=resumed.losses,
            **compare(full_parameters(resumed), uninterrupted, at_save),
        )

    result["resumed"] = [resume(dp, tp) for dp, tp in resume_splits]
    result["control"] = resume(2, 2, exclude_from_loading=("optimizer",))
    return result
