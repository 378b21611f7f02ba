"""``distsoap.SOAP``: the drop-in optimizer, torch.optim's front end of distsoap.

Same constructor as the public reference implementation. This class keeps the torch.optim
contract (param groups, state dicts, hooks, pickling) and the framework hooks; the work is below
it and flows one way: :meth:`SOAP.step` asks the strategy (:mod:`distsoap.strategies`), which
decides which blocks this rank computes and how gradients and updates travel, and the strategy
asks the block engine (:class:`~distsoap.engine.block_engine.BlockEngine`), which stacks blocks
of one shape into buckets and steps each with batched matmuls.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist

from distsoap.checkpointing import load_checks
from distsoap.checkpointing.consolidate import gather_block_states
from distsoap.checkpointing.state_dict import complete_state_dict, load_state
from distsoap.engine.block_engine import BlockEngine
from distsoap.engine.blocks import BlockSpec
from distsoap.engine.elementwise import choose_elementwise
from distsoap.engine.schedule import SCHEDULES
from distsoap.engine.storage import STORAGE_DTYPES
from distsoap.faults import FaultPolicy
from distsoap.hyperparams import (
    DEFAULTS,
    parse_dtype,
    validate_data_format,
    validate_group,
    validate_params,
)
from distsoap.placement import SPLIT_BLOCKS
from distsoap.strategies import Strategy, make_strategy
from distsoap.strategies.single import SingleProcess

_MOMENT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)

WRAPPER_BUILDING: ContextVar[bool] = ContextVar("distsoap_wrapper_building", default=False)
"""True while a framework wraps the optimizer (DeepSpeed's ``_configure_optimizer``): DeepSpeed's
fp16 wrapper calls ``step()`` once with all-zero gradients to allocate optimizer state, which for
SOAP would initialise the eigenbases from a zero gradient. Such a step does nothing."""


def _elementwise_from_compile_flag(compile_elementwise: object, elementwise: str) -> str:
    """The ``elementwise=`` name that the deprecated ``compile_elementwise=`` flag stands for."""
    if not isinstance(compile_elementwise, bool):
        raise ValueError(f"compile_elementwise must be True or False, got {compile_elementwise!r}")
    if elementwise != "auto":
        raise ValueError("give elementwise= or the deprecated compile_elementwise=, not both")
    warnings.warn(
        "compile_elementwise is deprecated: use elementwise='compile' (or 'auto')",
        DeprecationWarning,
        stacklevel=3,
    )
    return "compile" if compile_elementwise else "auto"


@contextmanager
def _load_hooks_suspended(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Keep torch's ``load_state_dict`` from running the load hooks a second time."""
    pre = optimizer._optimizer_load_state_dict_pre_hooks
    post = optimizer._optimizer_load_state_dict_post_hooks
    optimizer._optimizer_load_state_dict_pre_hooks = OrderedDict()
    optimizer._optimizer_load_state_dict_post_hooks = OrderedDict()
    try:
        yield
    finally:
        optimizer._optimizer_load_state_dict_pre_hooks = pre
        optimizer._optimizer_load_state_dict_post_hooks = post


class SOAP(torch.optim.Optimizer):
    """SOAP: Shampoo with Adam in the preconditioner's eigenbasis (Vyas et al., 2024).

    A drop-in replacement for the public reference implementation (same arguments, defaults and
    step-for-step behaviour; see docs/algorithm.md and the README's hyperparameter table), with the
    work batched over same-shape blocks.

    Args:
        params: parameters or param groups.
        lr: learning rate: a float, or a 1-element floating-point tensor (as torch's Adam; an
            LR scheduler then updates it in place). Keep such a tensor on the CPU: it is read
            once per bucket each step.
        betas: Adam's (beta1, beta2).
        shampoo_beta: EMA coefficient of the Kronecker factors; negative means beta2.
        eps: added to the square root of the (uncorrected) second moment.
        weight_decay: decoupled weight decay, applied after the update.
        precondition_frequency: refresh the eigenbases every this many updates.
        max_precond_dim: dims larger than this are not rotated.
        merge_dims: merge adjacent small dims before preconditioning.
        precondition_1d: precondition 1-D parameters too (else they get plain Adam).
        normalize_grads: divide each parameter's update by its RMS.
        data_format: ``"channels_first"`` or ``"channels_last"`` (4-D tensors are permuted
            NHWC -> NCHW before merging).
        correct_bias: fold Adam's bias correction into the step size.
        maximize: keyword-only; maximise the objective (torch's name): the gradient is negated
            before everything else (moments, Kronecker factors). A param-group option.
        refresh_tolerance: keyword-only; the adaptive refresh (0, the default, never skips): a
            due eigenbasis refresh is skipped while the current bases still diagonalise the
            factors, their relative off-diagonal mass ``||Q^T GG Q - diag||_F^2 / ||Q^T GG
            Q||_F^2`` below this for every factored dim. A param-group option.
        max_skipped_refreshes: keyword-only; the most refreshes a block skips in a row (then
            it refreshes whatever the mass). A param-group option.
        block_size: keyword-only; cut every dim larger than this into the fewest equal blocks
            of at most this size (the last zero-padded), each its own SOAP block with its own
            factors and bases, instead of leaving dims above ``max_precond_dim`` unrotated
            (None, the default: no blocking). Under a distributed strategy the blocks of one
            parameter may get different owners (see ``split_blocks``). A param-group option.
        one_sided: keyword-only; rotate only the smallest factored dim of each block (the SOAP
            paper's one-sided variant: a ``(m, n)`` matrix with ``m <= n`` keeps an ``m x m``
            factor and basis, its other side unrotated). A param-group option.
        stack_dims: keyword-only; the number of leading dims of each parameter that index a
            stack of independent matrices (default 0: none). With ``stack_dims=1`` an MoE
            expert weight ``(num_experts, d_in, d_out)`` is preconditioned as ``num_experts``
            separate ``(d_in, d_out)`` matrices, each with its own factors and bases, as if
            every expert were its own ``nn.Linear``. A param-group option: give it to the
            group of the expert weights (see the README, "torchtitan and tensor parallelism").
        moment_dtype: keyword-only; dtype of ``exp_avg`` and ``exp_avg_sq`` (fp32 default;
            bf16 halves their memory at some accuracy cost; fp64 parameters always use fp64).
            Dtypes may also be given by name (``"bf16"``, ``"float32"``), as JSON configs do.
        factor_dtype: keyword-only; storage dtype of the Kronecker factors (fp32 default; bf16
            or fp16 halve them; the math stays fp32, the result is rounded once per update).
        basis_dtype: keyword-only; storage dtype of the eigenbases (fp32 default; bf16 / fp16
            as ``factor_dtype``), guarded by ``basis_orthogonality_tol``.
        basis_orthogonality_tol: keyword-only; the drift guard of bases stored below fp32: a
            block whose new basis, rounded to ``basis_dtype``, has ``||Q^T Q - I||_F /
            sqrt(d)`` above this keeps fp32 bases from then on (counted in its
            ``basis_fallbacks`` state; bf16 rounding alone gives about 0.0024).
        strategy: keyword-only; ``"auto"`` (``"fsdp2"`` for DTensor parameters, ``"ddp"``
            when a process group of more than one rank is initialised, else ``"single"``),
            ``"single"`` (every rank computes everything), ``"ddp"`` (model wrapped in
            DistributedDataParallel; each block's state and work on one owner rank, updates
            all-gathered), ``"zero2"`` (no DDP wrapper: distsoap also synchronises the gradients,
            to their owners, during backward), ``"fsdp2"`` (FSDP2 / HSDP DTensor parameters,
            lossless: whole-matrix SOAP at each block's owner), ``"fsdp2_local"`` (SOAP on
            local shards, approximate) or ``"fsdp1"`` (FSDP1 with use_orig_params=True,
            lossless; needs ``fsdp_model``).
        process_group: keyword-only; the group to shard over (None: the world).
        comm_dtype: keyword-only; dtype of the updates on the wire. None (default) sends them
            exactly as computed (fp32; fp64 for fp64 parameters); bf16 and fp16 halve the bytes
            and are approximate (updates rounded once, equally on every rank, so replicas stay
            identical).
        bucket_cap_mb: keyword-only; MiB of gradients per communication bucket.
        split_blocks: keyword-only; whether placement may give the blocks of one blocked or
            stacked parameter several owner ranks: ``"auto"`` (default: only where placing
            every parameter whole would leave the busiest rank more than 5% above the mean)
            or ``"never"`` (every parameter whole on one owner, as before blocks had owners of
            their own). Where blocks are not boxes of the parameter's dims (merged dims,
            ``channels_last``), a split parameter costs a round trip of its rows each step
            under the sharded strategies (``python -m distsoap.plan`` gives its bytes under
            ``fsdp2``); the result is the same either way.
        fsdp_model: keyword-only; the FullyShardedDataParallel (FSDP1) model, for
            ``strategy="fsdp1"``, whose flat-parameter metadata says where each piece lives.
        nonfinite_grads: keyword-only; ``"skip"`` (default) leaves a block whose gradient holds
            NaN or Inf untouched for the step (counted in its ``nonfinite_skips`` state, warned
            about at most once a minute); ``"raise"`` makes it an error on every rank.
        max_basis_failures: keyword-only; consecutive failed eigenbasis computations (after fp64
            and jitter retries; the block keeps its previous basis meanwhile) of one block
            that raise an error naming the parameter.
        refresh_schedule: keyword-only; ``"aligned"`` (default, the reference: every block
            refreshes on the same step) or ``"staggered"`` (each block still every
            ``precondition_frequency`` updates, but phases spread so each step carries about
            1/f of the refresh work; see :mod:`distsoap.engine.schedule`).
        elementwise: keyword-only; the implementation of the elementwise rotated-Adam
            update, chosen as torch's ``foreach=`` / ``fused=``: ``"auto"`` (default: Triton for
            CUDA blocks with fp32 math when Triton is installed, else torch), ``"torch"`` (the
            reference definition), ``"compile"`` (``torch.compile`` of it: one graph, no
            recompiles when betas or step sizes change) or ``"triton"`` (the Triton kernel for
            every block; an error where it cannot run). See :mod:`distsoap.engine.elementwise`.
        compile_elementwise: keyword-only; deprecated spelling of ``elementwise="compile"``.

    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = DEFAULTS["lr"],
        betas: tuple[float, float] = DEFAULTS["betas"],
        shampoo_beta: float = DEFAULTS["shampoo_beta"],
        eps: float = DEFAULTS["eps"],
        weight_decay: float = DEFAULTS["weight_decay"],
        precondition_frequency: int = DEFAULTS["precondition_frequency"],
        max_precond_dim: int = DEFAULTS["max_precond_dim"],
        merge_dims: bool = DEFAULTS["merge_dims"],
        precondition_1d: bool = DEFAULTS["precondition_1d"],
        normalize_grads: bool = DEFAULTS["normalize_grads"],
        data_format: str = "channels_first",
        correct_bias: bool = DEFAULTS["correct_bias"],
        *,
        maximize: bool = False,
        stack_dims: int = 0,
        one_sided: bool = False,
        block_size: int | None = None,
        refresh_tolerance: float = 0.0,
        max_skipped_refreshes: int = 4,
        moment_dtype: torch.dtype | str = torch.float32,
        factor_dtype: torch.dtype | str = torch.float32,
        basis_dtype: torch.dtype | str = torch.float32,
        basis_orthogonality_tol: float = 0.01,
        strategy: str = "auto",
        process_group: dist.ProcessGroup | None = None,
        comm_dtype: torch.dtype | str | None = None,
        bucket_cap_mb: float = 25.0,
        split_blocks: str = "auto",
        fsdp_model: torch.nn.Module | None = None,
        nonfinite_grads: str = "skip",
        max_basis_failures: int = 3,
        refresh_schedule: str = "aligned",
        elementwise: str = "auto",
        compile_elementwise: bool | None = None,
    ):
        validate_data_format(data_format)
        moment_dtype = parse_dtype(moment_dtype, "moment_dtype")
        comm_dtype = parse_dtype(comm_dtype, "comm_dtype")
        if moment_dtype not in _MOMENT_DTYPES:
            raise ValueError(f"moment_dtype must be one of {_MOMENT_DTYPES}, got {moment_dtype}")
        factor_dtype = parse_dtype(factor_dtype, "factor_dtype")
        basis_dtype = parse_dtype(basis_dtype, "basis_dtype")
        for name, dtype in (("factor_dtype", factor_dtype), ("basis_dtype", basis_dtype)):
            if dtype not in STORAGE_DTYPES:
                raise ValueError(f"{name} must be one of {STORAGE_DTYPES}, got {dtype}")
        if not (
            isinstance(basis_orthogonality_tol, (int, float))
            and not isinstance(basis_orthogonality_tol, bool)
            and 0 <= basis_orthogonality_tol < math.inf
        ):
            raise ValueError(
                "basis_orthogonality_tol must be a real number >= 0 and finite, got "
                f"{basis_orthogonality_tol!r}"
            )
        if split_blocks not in SPLIT_BLOCKS:
            raise ValueError(f"split_blocks must be one of {SPLIT_BLOCKS}, got {split_blocks!r}")
        faults = FaultPolicy(nonfinite_grads, max_basis_failures)
        if refresh_schedule not in SCHEDULES:
            raise ValueError(
                f"refresh_schedule must be one of {SCHEDULES}, got {refresh_schedule!r}"
            )
        if compile_elementwise is not None:
            elementwise = _elementwise_from_compile_flag(compile_elementwise, elementwise)
        self.elementwise = elementwise
        """The name of the elementwise implementation (see ``elementwise=``)."""
        self.engine = BlockEngine(
            self,
            data_format=data_format,
            moment_dtype=moment_dtype,
            faults=faults,
            refresh_schedule=refresh_schedule,
            elementwise=choose_elementwise(elementwise),
            factor_dtype=factor_dtype,
            basis_dtype=basis_dtype,
            basis_orthogonality_tol=float(basis_orthogonality_tol),
            split_blocks=split_blocks,
        )
        """Buckets, step plans and due refreshes: the SOAP math strategies call."""
        self._consolidated: dict[int, dict[str, Any]] | None = None
        """Every rank's block states, on the rank that :meth:`consolidate_state_dict` gave them."""
        self._layouts: dict[int, tuple[torch.Size, torch.device]] = {}
        self.built_params: dict[int, list[torch.Tensor]] = {}
        """``id(group)`` -> the parameters the group was added with (frameworks that replace
        them, like DeepSpeed, are mapped back to these)."""
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
            maximize=maximize,
            stack_dims=stack_dims,
            one_sided=one_sided,
            block_size=block_size,
            refresh_tolerance=refresh_tolerance,
            max_skipped_refreshes=max_skipped_refreshes,
        )
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(complete_state_dict)
        self.strategy_options = dict(comm_dtype=comm_dtype, bucket_cap_mb=bucket_cap_mb)
        self._install(
            make_strategy(
                self.engine,
                strategy,
                process_group,
                comm_dtype=comm_dtype,
                bucket_cap_mb=bucket_cap_mb,
                fsdp_model=fsdp_model,
            )
        )

    @property
    def data_format(self) -> str:
        """``"channels_first"`` or ``"channels_last"`` (how 4-D parameters are blocked)."""
        return self.engine.data_format

    @property
    def moment_dtype(self) -> torch.dtype:
        """Dtype of ``exp_avg`` and ``exp_avg_sq`` (fp64 parameters use fp64)."""
        return self.engine.moment_dtype

    @property
    def factor_dtype(self) -> torch.dtype:
        """Storage dtype of the Kronecker factors (fp64 parameters use fp64)."""
        return self.engine.factor_dtype

    @property
    def basis_dtype(self) -> torch.dtype:
        """Storage dtype of the eigenbases (fp64 parameters use fp64)."""
        return self.engine.basis_dtype

    @property
    def basis_orthogonality_tol(self) -> float:
        """The drift guard's tolerance for bases stored below fp32."""
        return self.engine.basis_orthogonality_tol

    @property
    def split_blocks(self) -> str:
        """``"auto"`` or ``"never"``: whether a parameter's blocks may have several owners."""
        return self.engine.split_blocks

    @property
    def faults(self) -> FaultPolicy:
        """What happens on non-finite gradients and failed eigenbases."""
        return self.engine.faults

    @property
    def refresh_schedule(self) -> str:
        """``"aligned"`` or ``"staggered"`` eigenbasis refreshes."""
        return self.engine.refresh_schedule

    def _install(self, strategy: Strategy) -> None:
        """Make ``strategy`` the one that steps (the engine learns its state shapes)."""
        self._strategy = strategy
        self.engine.state_shape = strategy.state_shape
        self.engine.state_rows = strategy.state_rows
        self.engine.agree_skips = strategy.agree_skips
        self.engine.forget_offsets()

    @property
    def strategy(self) -> Strategy:
        """How the work is spread over ranks (single process, data parallel, ...)."""
        return self._strategy

    def set_strategy(self, strategy: Strategy) -> None:
        """Replace the strategy (integrations do, once they know how a framework wrapped us).

        Only before the first step: the placement of existing state would be lost.
        """
        if any(self.state.values()):
            raise RuntimeError("the strategy can only be replaced before the first step")
        self._strategy.close()  # mode B's gradient hooks would keep synchronising
        self._install(strategy)
        self.engine.reset()

    def parameters_replaced(self) -> None:
        """Accept new tensors in ``param_groups`` (a framework's fp32 master copies).

        They must have the shapes of the parameters they replace; SOAP's checks of shape and
        device follow them from now on.
        """
        self._layouts = {id(p): (p.shape, p.device) for g in self.param_groups for p in g["params"]}

    def state_element_bytes(self, param: torch.Tensor) -> tuple[int, int]:
        """Bytes per element of ``param``'s moments and of its factors / bases (placement)."""
        return self.engine.state_element_bytes(param)

    def state_bytes(self) -> int:
        """Bytes of SOAP state (moments, factors, bases) this rank holds."""
        return sum(
            t.numel() * t.element_size()
            for state in self.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        )

    @property
    def comm_stats(self) -> dict[str, object]:
        """Bytes this rank sent, by kind (``grad_sync``, ``update_gather``), last step and total."""
        return self._strategy.stats.as_dict()

    def no_sync(self) -> AbstractContextManager:
        """Skip gradient synchronisation for accumulation micro-batches (strategy="zero2").

        Backward passes inside the context only accumulate into ``.grad``; the backward of the
        last micro-batch, outside it, synchronises the accumulated gradients. Other strategies
        accept the context and do nothing (with DDP, use the model's own ``no_sync``).
        """
        return self._strategy.no_sync()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the (synchronised) gradients to a total 2-norm of ``max_norm``; return the norm.

        Equals ``torch.nn.utils.clip_grad_norm_`` on the data-parallel averaged gradients. With
        strategy="zero2" the local ``.grad`` are not averaged, so use this method, not torch's.
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        return self._strategy.clip_grad_norm_(float(max_norm))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group after checking its hyperparameters (ValueError if out of range).

        Integer, bool and meta-device parameters are a ValueError too.
        """
        super().add_param_group(param_group)
        try:
            validate_group(self.param_groups[-1], self.data_format)
            validate_params(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise
        for p in self.param_groups[-1]["params"]:
            self._layouts[id(p)] = (p.shape, p.device)
        group = self.param_groups[-1]
        self.built_params[id(group)] = list(group["params"])
        if getattr(self, "_strategy", None) is not None:
            self._strategy.param_groups_changed()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # defaults, state, param_groups
        engine = self.engine  # placement and hooks (the strategy) belong to this process
        state.update(
            data_format=engine.data_format,
            moment_dtype=engine.moment_dtype,
            factor_dtype=engine.factor_dtype,
            basis_dtype=engine.basis_dtype,
            basis_orthogonality_tol=engine.basis_orthogonality_tol,
            split_blocks=engine.split_blocks,
            faults=engine.faults,
            refresh_schedule=engine.refresh_schedule,
            elementwise=self.elementwise,
            strategy_options=self.strategy_options,
            _consolidated=self._consolidated,  # so a copy's state_dict() is the original's
            # by position: a copy's groups are new dicts, so ids would not match there
            built_params=[self.built_params.get(id(g), g["params"]) for g in self.param_groups],
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called when unpickling (pickle, copy.deepcopy), and by torch's load_state_dict on a
        # live optimizer, whose engine and strategy (placement, hooks) must stay as they are.
        unpickling = not hasattr(self, "engine")
        if unpickling:
            built = state.pop("built_params", None) or [g["params"] for g in state["param_groups"]]
            compiled = state.pop("compile_elementwise", None)  # pickles from before elementwise=
            if compiled is not None:
                state.setdefault("elementwise", "compile" if compiled else "auto")
            state.setdefault("elementwise", "auto")
            state.setdefault("strategy_options", dict(comm_dtype=None, bucket_cap_mb=25.0))
            state.setdefault("_consolidated", None)
            engine = BlockEngine(
                self,
                data_format=state.pop("data_format"),
                moment_dtype=state.pop("moment_dtype"),
                faults=state.pop("faults", None) or FaultPolicy("skip", 3),
                refresh_schedule=state.pop("refresh_schedule", "aligned"),
                elementwise=choose_elementwise(state["elementwise"]),
                factor_dtype=state.pop("factor_dtype", torch.float32),
                basis_dtype=state.pop("basis_dtype", torch.float32),
                basis_orthogonality_tol=state.pop("basis_orthogonality_tol", 0.01),
                split_blocks=state.pop("split_blocks", "auto"),
            )
        super().__setstate__(state)
        for group in self.param_groups:  # pickles and state dicts from before maximize existed
            group.setdefault("maximize", False)
            group.setdefault("stack_dims", 0)
            group.setdefault("one_sided", False)
            group.setdefault("block_size", None)
            group.setdefault("refresh_tolerance", 0.0)
            group.setdefault("max_skipped_refreshes", 4)
        self._layouts = {id(p): (p.shape, p.device) for g in self.param_groups for p in g["params"]}
        if unpickling:  # an unpickled optimizer is a local copy: it steps on this process only
            self.engine = engine
            self.built_params = {id(g): list(b) for g, b in zip(self.param_groups, built)}
            self._install(SingleProcess(self.engine))
            self.register_state_dict_post_hook(complete_state_dict)  # hooks are not pickled
        self.engine.reset()

    def block_spec(
        self, param: torch.Tensor, group: dict[str, Any], shape: tuple[int, ...] | None = None
    ) -> BlockSpec:
        """How this optimizer sees a parameter: :meth:`BlockEngine.block_spec`."""
        return self.engine.block_spec(param, group, shape)

    def param_name(self, param: torch.Tensor) -> str:
        """A name for ``param`` in messages (from named_parameters() input when given)."""
        return self.engine.param_name(param)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.

        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if WRAPPER_BUILDING.get():
            return loss
        self._consolidated = None  # a consolidated copy describes the state before this step
        with self.model_view():
            self._step()
        return loss

    def _step(self) -> None:
        if not self._strategy.views_model:
            self._check_layouts()
        self._strategy.step()
        # Every trainable parameter gets a state entry on every rank, empty where this rank
        # holds nothing for it (another rank owns it, or it has had no gradient yet). So
        # state_dict() names every parameter, which torch.distributed.checkpoint's strict
        # loading expects, and ``self.state`` is non-empty on every rank after a step, so DCP's
        # state-initialising step (it runs only where the state is empty) runs on all ranks or
        # on none: it is collective for the distributed strategies.
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self.state[p]  # noqa: B018 (defaultdict: creates the entry)

    def model_view(self) -> AbstractContextManager:
        """Context in which ``param_groups`` hold the model's parameters.

        A framework may replace them with tensors of its own (DeepSpeed ZeRO puts one flat fp32
        partition per group there); its strategy then knows how to show SOAP the parameters it
        preconditions, for the step and for state dicts. Otherwise it changes nothing.
        """
        return self._strategy.model_view()

    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict, numbered over the model's parameters (see :meth:`model_view`)."""
        with self.model_view():
            return super().state_dict()

    def _check_layouts(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._layouts:
                    raise RuntimeError(
                        "param_groups hold a tensor SOAP was not built with (shape "
                        f"{tuple(p.shape)}): a framework replaced the parameters. Under DeepSpeed, "
                        "import distsoap.integrations.deepspeed before deepspeed.initialize "
                        "(or use distsoap.integrations.deepspeed.initialize)"
                    )
                if self._layouts[id(p)] != (p.shape, p.device):
                    shape, device = self._layouts[id(p)]
                    raise ValueError(
                        f"a parameter changed from shape {tuple(shape)} on {device} to "
                        f"{tuple(p.shape)} on {p.device}; SOAP's state is tied to both "
                        "(create the optimizer after moving or resizing the model)"
                    )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this optimizer (any world size for lossless strategies).

        Unlike ``torch.optim.Optimizer.load_state_dict``, fp32 factors and bases of bf16
        parameters stay fp32 (tensors are only moved to the parameter's device, and copied), and
        state laid out differently (other layout hyperparameters or parameter shapes) is a
        ValueError. See :mod:`distsoap.checkpointing.state_dict`.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            returned = pre_hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        with self.model_view():
            problem = load_checks.find_problem(self, state_dict)
            problem = load_checks.agree(self, problem)
            if problem:
                raise ValueError(problem)
            with _load_hooks_suspended(self):  # they run here, around the whole load
                super().load_state_dict({**state_dict, "state": {}})
            load_state(self, state_dict)
            self.engine.reset()
            self.engine.forget_deferred_drift()  # verdicts about the state just replaced
            self._consolidated = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather every rank's SOAP state onto rank ``to`` (collective: call it on every rank).

        Afterwards, until the next ``step()`` or load, ``state_dict()`` on rank ``to`` holds
        every block's state, like a single-process optimizer's, and can be saved alone and
        loaded on every rank of a run of the same world size (each rank keeps the blocks it
        owns). This is what frameworks need that write rank 0's ``state_dict()`` only: Lightning
        calls it by itself (as for torch's ``ZeroRedundancyOptimizer``); HF Trainer through
        :class:`distsoap.integrations.hf.SOAPCheckpointCallback`. For any world size use
        torch.distributed.checkpoint instead (README, Checkpointing).

        Args:
            to: the rank (in the optimizer's process group) that receives the state.
        """
        self._consolidated = None
        group = getattr(self._strategy, "group", None)
        if self._strategy.name == "single" or not dist.is_initialized():
            return
        if not 0 <= to < dist.get_world_size(group):
            raise ValueError(
                f"to must be a rank in [0, {dist.get_world_size(group) - 1}], got {to!r}"
            )
        packed = self.state_dict()["state"]
        self._consolidated = gather_block_states(packed, group, to)
