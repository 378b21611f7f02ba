"""``distsoap.SOAP``: the drop-in optimizer.

Same constructor as the public reference implementation. Parameters are turned into blocks
(:mod:`distsoap.engine.blocks`), blocks of one shape are stacked into buckets
(:mod:`distsoap.engine.bucket`) and each bucket is stepped with batched matmuls
(:mod:`distsoap.engine.update`). A strategy (:mod:`distsoap.strategies`) decides which blocks this
rank computes and how gradients and updates travel; :meth:`SOAP.compute_updates` is the engine every
strategy calls.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist

from distsoap.checkpointing import load_checks as state_dict_checks
from distsoap.checkpointing.consolidate import gather_block_states
from distsoap.checkpointing.state_dict import (
    complete_state_dict,
    load_state,
    new_state_header,
)
from distsoap.engine.blocks import BlockSpec, layout_signature, make_block_spec
from distsoap.engine.bucket import Bucket, block_tensor_keys
from distsoap.engine.schedule import SCHEDULES, staggered_offsets
from distsoap.engine.step_plan import BucketStep
from distsoap.engine.update import first_call, refresh_rows, soap_update
from distsoap.faults import FaultPolicy, parameter_names
from distsoap.hyperparams import (
    DEFAULTS,
    parse_dtype,
    validate_data_format,
    validate_group,
    validate_params,
)
from distsoap.kernels import compiled_rotated_adam_direction, rotated_adam_direction
from distsoap.strategies import Strategy, make_strategy
from distsoap.strategies.single import SingleProcess

_MOMENT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)

MAX_STEP_PLANS = 8
"""Step plans kept (one per set of parameters with gradients; usually one is enough, but models
whose parameters get gradients in changing subsets must not grow the cache without bound)."""

_cached_block_spec = lru_cache(maxsize=None)(make_block_spec)
_cached_layout_signature = lru_cache(maxsize=None)(layout_signature)  # checked every step

WRAPPER_BUILDING: ContextVar[bool] = ContextVar("distsoap_wrapper_building", default=False)
"""True while a framework wraps the optimizer (DeepSpeed's ``_configure_optimizer``): DeepSpeed's
fp16 wrapper calls ``step()`` once with all-zero gradients to allocate optimizer state, which for
SOAP would initialise the eigenbases from a zero gradient. Such a step does nothing."""


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


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """Dtype of factors, bases and the math: fp64 for fp64 parameters, else fp32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def check_gradient(grad: torch.Tensor) -> None:
    """Reject gradients SOAP cannot precondition (a complex parameter has a complex gradient)."""
    if grad.is_sparse:
        raise RuntimeError("SOAP does not support sparse gradients (use a dense embedding)")
    if grad.is_complex():
        raise RuntimeError("SOAP does not support complex parameters or gradients")


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
        moment_dtype: keyword-only; dtype of ``exp_avg`` and ``exp_avg_sq`` (fp32 default;
            bf16 halves their memory at some accuracy cost; fp64 parameters always use fp64).
            Dtypes may also be given by name (``"bf16"``, ``"float32"``), as JSON configs do.
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
        compile_elementwise: keyword-only; run the elementwise rotated-Adam update through
            ``torch.compile`` (one graph, no recompiles when betas or step sizes change).

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
        moment_dtype: torch.dtype | str = torch.float32,
        strategy: str = "auto",
        process_group: dist.ProcessGroup | None = None,
        comm_dtype: torch.dtype | str | None = None,
        bucket_cap_mb: float = 25.0,
        fsdp_model: torch.nn.Module | None = None,
        nonfinite_grads: str = "skip",
        max_basis_failures: int = 3,
        refresh_schedule: str = "aligned",
        compile_elementwise: bool = False,
    ):
        validate_data_format(data_format)
        moment_dtype = parse_dtype(moment_dtype, "moment_dtype")
        comm_dtype = parse_dtype(comm_dtype, "comm_dtype")
        if moment_dtype not in _MOMENT_DTYPES:
            raise ValueError(f"moment_dtype must be one of {_MOMENT_DTYPES}, got {moment_dtype}")
        self.data_format = data_format
        self.moment_dtype = moment_dtype
        self.faults = FaultPolicy(nonfinite_grads, max_basis_failures)
        if refresh_schedule not in SCHEDULES:
            raise ValueError(
                f"refresh_schedule must be one of {SCHEDULES}, got {refresh_schedule!r}"
            )
        if not isinstance(compile_elementwise, bool):
            raise ValueError(
                f"compile_elementwise must be True or False, got {compile_elementwise!r}"
            )
        self.refresh_schedule = refresh_schedule
        self._elementwise = (
            compiled_rotated_adam_direction if compile_elementwise else rotated_adam_direction
        )
        self._offsets: dict[int, int] = {}
        self._due_refreshes: list = []
        self._consolidated: dict[int, dict[str, Any]] | None = None
        """Every rank's block states, on the rank that :meth:`consolidate_state_dict` gave them."""
        self._buckets: dict[tuple, Bucket] = {}
        self._plans: dict[tuple, list[BucketStep]] = {}
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
        )
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(complete_state_dict)
        self.strategy_options = dict(comm_dtype=comm_dtype, bucket_cap_mb=bucket_cap_mb)
        self._strategy = make_strategy(
            self,
            strategy,
            process_group,
            comm_dtype=comm_dtype,
            bucket_cap_mb=bucket_cap_mb,
            fsdp_model=fsdp_model,
        )

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
        hooks = getattr(self._strategy, "grad_sync", None)
        if hooks is not None:  # mode B's gradient hooks would keep synchronising
            hooks.remove()
        self._strategy = strategy
        self._reset_buckets()
        self._offsets = {}

    def parameters_replaced(self) -> None:
        """Accept new tensors in ``param_groups`` (a framework's fp32 master copies).

        They must have the shapes of the parameters they replace; SOAP's checks of shape and
        device follow them from now on.
        """
        self._layouts = {id(p): (p.shape, p.device) for g in self.param_groups for p in g["params"]}

    def state_element_bytes(self, param: torch.Tensor) -> tuple[int, int]:
        """Bytes per element of ``param``'s moments and of its factors / bases (placement)."""
        if param.dtype == torch.float64:
            return 8, 8
        return self.moment_dtype.itemsize, 4

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
        state = super().__getstate__()
        state.update(
            data_format=self.data_format,
            moment_dtype=self.moment_dtype,
            faults=self.faults,
            refresh_schedule=self.refresh_schedule,
            strategy_options=self.strategy_options,
            _consolidated=self._consolidated,  # so a copy's state_dict() is the original's
            compile_elementwise=self._elementwise is compiled_rotated_adam_direction,
            # by position: a copy's groups are new dicts, so ids would not match there
            built_params=[self.built_params.get(id(g), g["params"]) for g in self.param_groups],
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called when unpickling (pickle, copy.deepcopy), and by torch's load_state_dict on a
        # live optimizer, whose strategy (placement, hooks) must stay as it is.
        unpickling = not hasattr(self, "_strategy")
        if unpickling:
            built = state.pop("built_params", None) or [g["params"] for g in state["param_groups"]]
            compiled = state.pop("compile_elementwise", False)
            state.setdefault("faults", FaultPolicy("skip", 3))
            state.setdefault("refresh_schedule", "aligned")
            state.setdefault("strategy_options", dict(comm_dtype=None, bucket_cap_mb=25.0))
            state.setdefault("_consolidated", None)
            elementwise = compiled_rotated_adam_direction if compiled else rotated_adam_direction
            state.update(_elementwise=elementwise, _offsets={}, _due_refreshes=[])
        super().__setstate__(state)
        for group in self.param_groups:  # pickles and state dicts from before maximize existed
            group.setdefault("maximize", False)
        self._reset_buckets()
        self._layouts = {id(p): (p.shape, p.device) for g in self.param_groups for p in g["params"]}
        if unpickling:  # an unpickled optimizer is a local copy: it steps on this process only
            self.built_params = {id(g): list(b) for g, b in zip(self.param_groups, built)}
            self._strategy = SingleProcess(self)
            self.register_state_dict_post_hook(complete_state_dict)  # hooks are not pickled

    def block_spec(
        self, param: torch.Tensor, group: dict[str, Any], shape: tuple[int, ...] | None = None
    ) -> BlockSpec:
        """How this optimizer sees a parameter (its block shape and factored dims).

        Args:
            param: the parameter.
            group: its param group.
            shape: the shape of the tensor SOAP preconditions, when it is not ``param.shape``
                (a sharded parameter's full shape, or its local shard's).
        """
        return _cached_block_spec(
            tuple(param.shape if shape is None else shape),
            max_precond_dim=group["max_precond_dim"],
            merge_dims=group["merge_dims"],
            precondition_1d=group["precondition_1d"],
            data_format=self.data_format,
        )

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
        if not self._views_model:
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

    @property
    def _views_model(self) -> bool:
        return hasattr(self._strategy, "model_view")

    def model_view(self) -> AbstractContextManager:
        """Context in which ``param_groups`` hold the model's parameters.

        A framework may replace them with tensors of its own (DeepSpeed ZeRO puts one flat fp32
        partition per group there); its strategy then knows how to show SOAP the parameters it
        preconditions, for the step and for state dicts. Otherwise it changes nothing.
        """
        return self._strategy.model_view() if self._views_model else nullcontext()

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

    def compute_updates(
        self, grads: dict[int, torch.Tensor], defer_refresh: bool = False
    ) -> dict[int, tuple[dict[str, Any], torch.Tensor | None]]:
        """SOAP on this rank's blocks: advance their state and return their parameter deltas.

        This is the engine every strategy calls; it does not touch the parameters.

        Args:
            grads: ``id(param)`` -> the gradient SOAP preconditions for that parameter: its full
                gradient (parameter shape), or, for sharded parameters, the assembled full
                gradient or (local mode) the local shard's. Only these parameters are stepped;
                their state lives on this rank, laid out for that gradient's shape. Zero-size
                gradients are no-ops: no state, no update (as torch's Adam).
            defer_refresh: leave the due eigenbasis refreshes to :meth:`finish_refreshes`
                (strategies run them while the updates travel).

        Returns:
            ``id(param)`` -> (its param group, its delta ``-step_size * U`` in the gradient's
            shape, or None on a first call, which makes no update).

        """
        result: dict[int, tuple[dict[str, Any], torch.Tensor | None]] = {}
        for grad in grads.values():
            check_gradient(grad)
        finite = self.faults.finite(grads)
        plan_key = (tuple(grads), self._groups_signature())
        plan = self._plans.get(plan_key) if all(finite.values()) else None
        if plan is None or any(self._buckets.get(b.key) is not b.bucket for b in plan):
            plan, reusable = self._plan_step(grads, finite, result)
            if reusable:
                if len(self._plans) >= MAX_STEP_PLANS:  # drop the oldest
                    del self._plans[next(iter(self._plans))]
                self._plans[plan_key] = plan
        for bucket_step in plan:
            deltas = self._step_bucket(bucket_step, grads)
            for param, delta in zip(bucket_step.params, deltas):
                result[id(param)] = (bucket_step.group, delta)
        if not defer_refresh:
            self.finish_refreshes()
        return result

    def _groups_signature(self) -> tuple:
        """What a step plan depends on besides the stepped parameters (see engine.step_plan)."""
        return tuple(
            (
                id(g),
                len(g["params"]),
                g["max_precond_dim"],
                g["merge_dims"],
                g["precondition_1d"],
            )
            for g in self.param_groups
        )

    def _plan_step(
        self,
        grads: dict[int, torch.Tensor],
        finite: dict[int, bool],
        result: dict[int, tuple[dict[str, Any], torch.Tensor | None]],
    ) -> tuple[list[BucketStep], bool]:
        """Route this step's blocks: first calls and skipped blocks now, the rest into buckets.

        First calls and non-finite skips are handled here and recorded in ``result``.

        Returns:
            The bucket steps of the blocks to update, and whether the plan may be reused (no
            first call and no skip this step).
        """
        reusable = True
        plan: list[BucketStep] = []
        for index, group in enumerate(self.param_groups):
            ready: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for param in group["params"]:
                grad = grads.get(id(param))
                if grad is None or grad.numel() == 0:  # zero-size: nothing to precondition
                    continue
                state = self.state[param]
                if not finite[id(param)]:
                    self.faults.nonfinite(self.param_name(param), state)
                    result[id(param)] = (group, None)
                    reusable = False
                    continue
                spec = self.block_spec(param, group, tuple(grad.shape))
                if not state.get("bases_ready", False):
                    self._first_call(param, grad, spec, group, state)
                    result[id(param)] = (group, None)
                    reusable = False
                    continue
                layout = _cached_layout_signature(spec)
                if state.get("block_layout", layout) != layout:
                    raise ValueError(
                        f"parameter {self.param_name(param)}: its SOAP state is laid out as "
                        f"{state['block_layout']}, but max_precond_dim / merge_dims / "
                        f"precondition_1d now give {layout}; these cannot change during training"
                    )
                key = (
                    index,
                    spec.block_shape,
                    spec.factored,
                    compute_dtype(param),
                    param.device,
                    state["precondition_frequency"],
                    state["shampoo_beta"],
                )
                ready[key].append(param)
            for key, params in ready.items():
                bucket = self._bucket(key, params)
                states = [self.state[p] for p in params]
                plan.append(
                    BucketStep(
                        key=key,
                        bucket=bucket,
                        group=group,
                        params=params,
                        states=states,
                        rows=[bucket.row[id(p)] for p in params],
                        specs=[
                            self.block_spec(p, group, tuple(grads[id(p)].shape)) for p in params
                        ],
                        offsets=[s.get("refresh_offset", 0) for s in states],
                    )
                )
        return plan, reusable

    def _first_call(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        spec: BlockSpec,
        group: dict[str, Any],
        state: dict[str, Any],
    ) -> None:
        if "step" not in state:
            header = new_state_header(group, spec, self._refresh_offset(param, group))
            for key, value in header.items():
                state.setdefault(key, value)  # keeps a non-finite skip counted before
        dtype = compute_dtype(param)
        moments = torch.float64 if dtype == torch.float64 else self.moment_dtype
        block = spec.to_block(grad).to(dtype)
        if group.get("maximize", False):
            block = block.neg()  # not in place: it may be the caller's gradient
        decomposed = first_call(state, spec.factored, block, moments)
        if not decomposed or state["bases_ready"]:
            self.faults.basis(self.param_name(param), state, failed=not decomposed)

    def param_name(self, param: torch.Tensor) -> str:
        """A name for ``param`` in messages (from named_parameters() input when given).

        The names of all parameters are built once per layout of the param groups (every
        refreshed block reports to the fault counters by name, so building them per call
        would cost O(parameters^2) on a refresh step).
        """
        signature = self._groups_signature()
        cached = getattr(self, "_names", None)
        if cached is None or cached[0] != signature:
            cached = self._names = (signature, parameter_names(self.param_groups))
        return cached[1].get(id(param), "an unknown parameter")

    def _reset_buckets(self) -> None:
        """Forget the buckets and the step plans using them (state is rebuilt from state[p])."""
        self._buckets = {}
        self._plans = {}

    def _bucket(self, key: tuple, params: list[torch.Tensor]) -> Bucket:
        """The bucket for ``key``, (re)built if some of ``params`` are not members yet."""
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.holds(params):
            return bucket
        members = list(bucket.params) if bucket is not None else []
        known = {id(p) for p in members}
        members += [p for p in params if id(p) not in known]
        keys = block_tensor_keys(key[2])
        bucket = Bucket(members, [self.state[p] for p in members], keys)
        self._buckets[key] = bucket
        return bucket

    def _step_bucket(
        self, bucket_step: BucketStep, grads: dict[int, torch.Tensor]
    ) -> list[torch.Tensor]:
        _, block_shape, _, dtype, _, frequency, shampoo_beta = bucket_step.key
        stacked = bucket_step.stack_grads(grads, dtype)  # a new tensor
        if bucket_step.group.get("maximize", False):
            stacked.neg_()
        steps = []
        for state in bucket_step.states:
            state["step"] += 1
            steps.append(state["step"])
        bucket, rows = bucket_step.bucket, bucket_step.rows
        tensors = bucket.select(rows)
        deltas, due = soap_update(
            tensors,
            stacked,
            steps,
            bucket_step.group,
            shampoo_beta,
            frequency,
            bucket_step.offsets,
            self._elementwise,
        )
        bucket.write_back(rows, tensors)
        if due:
            self._due_refreshes.append((bucket, [rows[i] for i in due], len(block_shape)))
        return bucket_step.split_deltas(deltas)

    def finish_refreshes(self) -> None:
        """Run the eigenbasis refreshes the last ``compute_updates`` left due.

        They change only the state of the next step, so a strategy calls this while the
        step's updates are on the wire.
        """
        due, self._due_refreshes = self._due_refreshes, []
        for bucket, rows, rank in due:
            tensors = bucket.select(rows)
            failed = set(refresh_rows(tensors, list(range(len(rows))), rank))
            bucket.write_back(rows, tensors)
            for i, row in enumerate(rows):
                param = bucket.params[row]
                self.faults.basis(self.param_name(param), self.state[param], i in failed)

    def _refresh_offset(self, param: torch.Tensor, group: dict[str, Any]) -> int:
        """Return the block's refresh phase (0 for the aligned schedule)."""
        if self.refresh_schedule == "aligned":
            return 0
        if id(param) not in self._offsets:
            self._offsets = staggered_offsets(self)
        return self._offsets.get(id(param), 0)

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
            problem = state_dict_checks.find_problem(self, state_dict)
            problem = state_dict_checks.agree(self, problem)
            if problem:
                raise ValueError(problem)
            with _load_hooks_suspended(self):  # they run here, around the whole load
                super().load_state_dict({**state_dict, "state": {}})
            load_state(self, state_dict)
            self._reset_buckets()
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
