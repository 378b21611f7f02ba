"""DeepSpeed ZeRO 1, 2 and 3 (and DeepSpeed's BF16 optimizer): lossless SOAP on flat partitions.

From ZeRO stage 1 on, DeepSpeed hands the optimizer one flat fp32 tensor per param group (stage
3: per sub-group), cut at arbitrary element offsets, with its gradient in ``.grad``; it calls
``step()`` once per group (stages 1, 2) or sub-group (stage 3) and then copies the flat tensor
back into the model. Matrix shapes are gone from that view, so this strategy recovers them from
DeepSpeed's own metadata:

- stages 1, 2 and the BF16 optimizer: each model parameter's ``_hp_mapping`` says which element
  range of the parameter lies in this rank's flat partition, and where;
- stage 3: each parameter is cut into ``world`` equal pieces (the last padded), and a sub-group's
  flat tensor is its parameters' pieces one after another.

Each parameter thus becomes a 1-D layout (element ranges per rank), and the step is the lossless
one of :class:`~distsoap.strategies.sharded.ShardedLossless`: gradient pieces to the block's owner
(placement as in data-parallel mode), whole-matrix SOAP there, update pieces back into each rank's
flat partition. SOAP's state is keyed by the model's parameters: inside :meth:`model_view` the
param groups hold them, so state dicts (which DeepSpeed saves per rank) number them as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from distsoap.engine.block_engine import BlockEngine
from distsoap.sharding import ShardLayout
from distsoap.strategies.sharded import ShardedLossless


@dataclass(frozen=True)
class LocalFragment:
    """Where a model parameter's local piece sits in this rank's flat partition."""

    flat: torch.Tensor
    """The flat fp32 tensor DeepSpeed steps (a group's partition or a stage-3 sub-group)."""
    flat_offset: int
    """Offset of the piece in ``flat``."""


class DeepSpeedPartitions(ShardedLossless):
    """Whole-matrix SOAP under DeepSpeed ZeRO (see the module docstring).

    Args:
        engine: the block engine of the SOAP optimizer DeepSpeed wrapped.
        built_params: ``id(param group)`` -> the model parameters the optimizer was built with
            (``SOAP.built_params``; DeepSpeed has replaced them in the groups since).
        wrapper: DeepSpeed's optimizer wrapping it (``engine.optimizer``).
        group: DeepSpeed's data-parallel process group.
        comm_dtype: dtype of updates on the wire (None: exact).
        name: the strategy name to report (``deepspeed_zero1`` ...).
    """

    views_model = True

    def __init__(
        self,
        engine: BlockEngine,
        built_params: dict[int, list[torch.Tensor]],
        wrapper: Any,
        group: dist.ProcessGroup | None,
        comm_dtype: torch.dtype | None,
        name: str = "deepspeed",
    ):
        self.groups = list(engine.param_groups)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        model_lists = _model_params(built_params, self.groups)
        stage3 = hasattr(wrapper, "fp32_partitioned_groups_flat")
        if stage3:
            layouts, local, units = _stage3_layout(wrapper, rank, world)
        else:
            layouts, local, units = _hp_mapping_layout(wrapper, model_lists, group, world)
        trainable = [p for params in model_lists for p in params if p.requires_grad]
        missing = [i for i, p in enumerate(trainable) if id(p) not in layouts]
        if missing:
            raise ValueError(
                f"DeepSpeed does not hold trainable parameters {missing} of the SOAP optimizer "
                "in its partitions; build the optimizer from the model DeepSpeed wraps"
            )
        self.model_lists = model_lists
        super().__init__(
            engine,
            group,
            layouts,
            name,
            comm_dtype,
            param_lists=list(zip(self.groups, model_lists)),
        )
        self.local = {self._index[k]: v for k, v in local.items()}
        self.units = {id(flat): tuple(sorted(self._index[k] for k in keys)) for flat, keys in units}
        self.flats = {id(flat): flat for flat, _ in units}
        self._active: list[torch.Tensor] = []
        self._in_view = False
        self._stepped: set[int] = set()

    @contextmanager
    def model_view(self) -> Iterator[None]:
        """Param groups hold the model's parameters inside; DeepSpeed's tensors again after.

        Also remembers which flat tensors DeepSpeed's view held (the ones a step updates) and
        drops the empty state entries DeepSpeed's bookkeeping creates for them.
        """
        if self._in_view:
            yield
            return
        opt = self.engine.host  # the param groups themselves are swapped, so the host's
        outer = opt.param_groups
        self._active = [t for g in outer for t in g["params"]]
        deepspeed_params = [g["params"] for g in self.groups]
        for group, params in zip(self.groups, self.model_lists):
            group["params"] = params
        shown = list(self.groups)
        opt.param_groups = shown
        model_ids = {id(p) for params in self.model_lists for p in params}
        for key in [k for k, v in opt.state.items() if id(k) not in model_ids and not v]:
            del opt.state[key]
        self._in_view = True
        try:
            yield
        finally:
            self._in_view = False
            if opt.param_groups is not shown:  # load_state_dict made new group dicts
                for old, new in zip(self.groups, opt.param_groups):
                    old.update({k: v for k, v in new.items() if k != "params"})
            for group, params in zip(self.groups, deepspeed_params):
                group["params"] = params
            opt.param_groups = outer

    def _local_grad(self, index: int) -> torch.Tensor | None:
        fragment = self.local.get(index)
        n = self.layouts[index].numel(self.rank)
        if fragment is None:
            return torch.zeros(0, dtype=self.exact, device=self._device())
        grad = fragment.flat.grad
        return None if grad is None else grad.narrow(0, fragment.flat_offset, n)

    def _local_target(self, index: int) -> torch.Tensor:
        fragment = self.local[index]
        n = self.layouts[index].numel(self.rank)
        return fragment.flat.narrow(0, fragment.flat_offset, n)

    def _grad_dtype(self, index: int) -> torch.dtype:
        """DeepSpeed's gradients are fp32 whatever the model's dtype: keep them so."""
        return self.exact

    def _device(self) -> torch.device:
        for flat in self.flats.values():
            return flat.device
        return torch.device("cpu")

    @torch.no_grad()
    def step(self) -> None:
        """Step the parameters of the flat tensors DeepSpeed's view holds now."""
        items: set[int] = set()
        for tensor in self._active:
            unit = self.units.get(id(tensor))
            if unit is None:
                raise RuntimeError(
                    "DeepSpeed asked SOAP to step a tensor distsoap does not know "
                    f"(shape {tuple(tensor.shape)}); was the optimizer re-wrapped after "
                    "distsoap.integrations.deepspeed bound it?"
                )
            items.update(unit)
        self.step_items(tuple(sorted(items)))

    def end_step(self) -> None:
        """Close the byte counts once every flat tensor has been stepped.

        DeepSpeed calls ``step()`` once per group (stages 1, 2) or sub-group (stage 3) in one
        training step, so ``comm_stats`` would otherwise count each call as a step.
        """
        self._stepped.update(id(t) for t in self._active)
        if self._stepped >= set(self.flats):
            self.stats.end_step()
            self._stepped = set()

    def param_groups_changed(self) -> None:
        """DeepSpeed fixes the groups when it builds its partitions."""
        raise RuntimeError(
            "add_param_group is not supported under DeepSpeed ZeRO: DeepSpeed has already "
            "partitioned the param groups it was given"
        )


def _model_params(
    built: dict[int, list[torch.Tensor]], groups: list[dict[str, Any]]
) -> list[list[torch.Tensor]]:
    """Each group's model parameters, as the optimizer was built with them."""
    try:
        return [list(built[id(group)]) for group in groups]
    except KeyError:
        raise RuntimeError(
            "a param group DeepSpeed steps is not one the SOAP optimizer was built with"
        ) from None


def _flat_layout(shape: tuple[int, ...], ranges: list[tuple[int, int]]) -> ShardLayout:
    numel = int(torch.Size(shape).numel())
    return ShardLayout(shape, (numel,), 0, tuple(ranges), (0,) * len(ranges))


def _hp_mapping_layout(wrapper: Any, model_lists, group, world: int):
    """Layouts from ``_hp_mapping`` (ZeRO 1, 2 and the BF16 optimizer), gathered once."""
    if hasattr(wrapper, "single_partition_of_fp32_groups"):
        flats = list(wrapper.single_partition_of_fp32_groups)
    elif hasattr(wrapper, "fp32_groups_flat_partition"):
        flats = list(wrapper.fp32_groups_flat_partition)
    else:
        raise TypeError(f"distsoap does not know DeepSpeed's {type(wrapper).__name__}")
    if len(flats) != len(model_lists):
        raise RuntimeError(
            f"DeepSpeed holds {len(flats)} flat partitions for {len(model_lists)} param groups"
        )
    mine: dict[tuple[int, int], tuple[int, int, int]] = {}
    local: dict[int, LocalFragment] = {}
    units = []
    for g, (flat, params) in enumerate(zip(flats, model_lists)):
        keys = []
        for j, p in enumerate(params):
            if not p.requires_grad:
                continue
            keys.append(id(p))
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            mine[(g, j)] = (lp.start, lp.start + lp.numel, hp.start)
            local[id(p)] = LocalFragment(flat, hp.start)
        units.append((flat, keys))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    layouts = {}
    for g, params in enumerate(model_lists):
        for j, p in enumerate(params):
            if not p.requires_grad:
                continue
            ranges = [pieces.get((g, j), (0, 0, 0))[:2] for pieces in gathered]
            layout = _flat_layout(tuple(p.shape), ranges)
            _check_covered(layout, p)
            layouts[id(p)] = layout
    return layouts, local, units


def _stage3_layout(wrapper: Any, rank: int, world: int):
    """Layouts of ZeRO-3's even per-parameter pieces; each sub-group's flat tensor in order."""
    layouts, local, units = {}, {}, []
    for sub_group, flat in zip(wrapper.fp16_groups, wrapper.fp32_partitioned_groups_flat):
        offset, keys = 0, []
        for p in sub_group:
            shape = tuple(p.ds_shape)
            numel = int(p.ds_numel)
            piece = int(p.partition_numel())
            ranges = [(min(r * piece, numel), min((r + 1) * piece, numel)) for r in range(world)]
            layouts[id(p)] = _flat_layout(shape, ranges)
            local[id(p)] = LocalFragment(flat, offset)
            keys.append(id(p))
            offset += piece
        if offset != flat.numel():
            raise RuntimeError(
                f"a ZeRO-3 sub-group's flat tensor has {flat.numel()} elements, but its "
                f"parameters' pieces add up to {offset}"
            )
        units.append((flat, keys))
    return layouts, local, units


def _check_covered(layout: ShardLayout, param: torch.Tensor) -> None:
    """Every element of the parameter must be held by exactly one rank."""
    covered = sorted(r for r in layout.ranges if r[1] > r[0])
    position = 0
    for start, stop in covered:
        if start != position:
            break
        position = stop
    if position != param.numel():
        raise RuntimeError(
            f"DeepSpeed's partitions cover a parameter of shape {tuple(param.shape)} as "
            f"{covered}, not exactly once; distsoap cannot assemble it"
        )
