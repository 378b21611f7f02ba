"""Blocks: how SOAP sees one parameter.

A *block* is a parameter tensor as the preconditioner sees it: optionally permuted (channels_last
4-D tensors become NCHW) and with adjacent small dims merged (``merge_dims``). Each block dim of
size <= ``max_precond_dim`` is *factored*: it gets a Kronecker factor and an eigenbasis; larger
dims are left unrotated. The rules follow docs/algorithm.md ("Shapes").

A param group's ``one_sided`` (default False) keeps only the smallest factored dim of each block
(the SOAP paper's one-sided variant: the memory and refresh cost of the larger side saved).

A param group's ``block_size`` (default None) cuts dims larger than it into blocks, each its own
SOAP block with its own factors and bases (stored as rows, like a stack), instead of leaving a
large dim unrotated: blocks of a d x d factor cost ``k (d/k)^2`` memory and ``k (d/k)^3``
refresh work. Padding never mixes into a block's real part (see ``BlockSpec.padding``).

A param group's ``stack_dims`` (default 0) makes a parameter's leading dims index a *stack* of
independent matrices (MoE experts stored as ``(num_experts, d_in, d_out)``): the rules above
apply to the trailing dims, and every matrix of the stack gets its own factors and bases, as if
it were a parameter of its own. Such a block is stored as rows: ``(rows, *block_shape)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

DATA_FORMATS = ("channels_first", "channels_last")


def merge_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """Merge adjacent dims while their product stays <= ``max_precond_dim``.

    Walks the dims left to right keeping a running product. When multiplying in the next dim
    would exceed ``max_precond_dim``, the running product is emitted (or the dim itself when the
    running product is 1). A trailing running product of 1 is dropped unless nothing was emitted.

    Args:
        shape: the tensor shape to merge.
        max_precond_dim: the largest merged dim that is still preconditioned.

    Returns:
        The merged shape; its product equals the product of ``shape``.

    """
    merged: list[int] = []
    running = 1
    for dim in shape:
        if running * dim > max_precond_dim:
            if running > 1:
                merged.append(running)
                running = dim
            else:
                merged.append(dim)
                running = 1
        else:
            running *= dim
    if running > 1 or not merged:
        merged.append(running)
    return tuple(merged)


@dataclass(frozen=True)
class BlockSpec:
    """The layout of one parameter as a SOAP block (or a stack of them).

    Attributes:
        param_shape: shape of the parameter (and of its gradient).
        channels_last: the 4-D parameter is stored NHWC and is permuted to NCHW before merging.
        block_shape: shape of one block after the permutation, merging and blocking; moments
            are stored in this shape (led by the rows when there are several blocks).
        factored: one flag per block dim: True when that dim has a factor and an eigenbasis.
        stack_shape: the parameter's leading dims that index independent matrices (empty: the
            parameter is one matrix).
        grid: per block dim, how many blocks ``block_size`` cuts it into (empty: no blocking).
            Each block of the grid is its own SOAP block; the last ones along a dim may be
            zero-padded to the common size (see :mod:`distsoap.engine.blocking`).
        merged_shape: with a grid, the shape before blocking (after permutation and merging).
        held_rows: the rows (global indices among :attr:`full_rows`) whose state this spec
            describes, when a rank holds only some blocks of the parameter (data-parallel
            placement gives each block its own owner); empty: every row. Tensors of such a
            spec are always in row form, ``(len(held_rows), *block_shape)``.

    """

    param_shape: tuple[int, ...]
    channels_last: bool
    block_shape: tuple[int, ...]
    factored: tuple[bool, ...]
    stack_shape: tuple[int, ...] = ()
    grid: tuple[int, ...] = ()
    merged_shape: tuple[int, ...] = ()
    held_rows: tuple[int, ...] = ()

    @property
    def blocked(self) -> bool:
        """Some dim is cut into several blocks (``block_size``)."""
        return math.prod(self.grid) > 1

    @property
    def stacked(self) -> bool:
        """The parameter is several blocks (a stack, or blocked): its state leads with rows."""
        return bool(self.stack_shape) or self.blocked or bool(self.held_rows)

    @property
    def full_rows(self) -> int:
        """Number of independent blocks of the parameter: stack matrices times blocks each."""
        return math.prod(self.stack_shape) * math.prod(self.grid)

    @property
    def rows(self) -> int:
        """Number of blocks this spec's state holds (:attr:`full_rows`, or the held ones)."""
        return len(self.held_rows) if self.held_rows else self.full_rows

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of the block's moments: ``block_shape``, led by ``rows`` when stacked."""
        return (self.rows, *self.block_shape) if self.stacked else self.block_shape

    @property
    def factor_dims(self) -> list[int]:
        """Sizes of the factored dims, in block-dim order."""
        return [d for d, f in zip(self.block_shape, self.factored, strict=True) if f]

    @property
    def numel(self) -> int:
        """Number of elements of the parameter."""
        return math.prod(self.param_shape)

    @property
    def state_numel(self) -> int:
        """Elements of each moment (the parameter's, plus the padding of blocks)."""
        return math.prod(self.state_shape)

    def _matrix_shape(self) -> tuple[int, ...]:
        """One matrix of the stack before blocking (``block_shape`` without a grid)."""
        return self.merged_shape if self.grid else self.block_shape

    def to_block(self, tensor: torch.Tensor) -> torch.Tensor:
        """View (or copy, if the layout demands it) a parameter-shaped tensor as a block.

        A stacked or blocked parameter gives ``(rows, *block_shape)``.
        """
        lead = len(self.stack_shape)
        if self.channels_last:
            tensor = tensor.permute(*range(lead), lead, lead + 3, lead + 1, lead + 2)
        matrices = math.prod(self.stack_shape)
        tensor = tensor.reshape(matrices, *self._matrix_shape())
        if self.blocked:
            tensor = split_blocks(tensor, self.grid, self.block_shape)
        return tensor if self.stacked else tensor.squeeze(0)

    def from_block(self, tensor: torch.Tensor) -> torch.Tensor:
        """Bring a block-shaped tensor back to the parameter's shape (a view where possible)."""
        lead = len(self.stack_shape)
        if self.blocked:
            tensor = join_blocks(tensor, self.grid, self.block_shape, self.merged_shape)
        if self.channels_last:
            n, h, w, c = self.param_shape[lead:]
            tensor = tensor.reshape(*self.stack_shape, n, c, h, w)
            return tensor.permute(*range(lead), lead, lead + 2, lead + 3, lead + 1)
        return tensor.reshape(self.param_shape)

    def to_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A parameter-shaped tensor as ``(rows, *block_shape)`` (one row when not stacked).

        With :attr:`held_rows` the tensor is already in row form (checked) and returned as is.
        """
        if self.held_rows:
            if tuple(tensor.shape) != self.state_shape:
                raise ValueError(
                    f"blocks {self.held_rows} of a parameter of shape {self.param_shape} take "
                    f"tensors of shape {self.state_shape}, got {tuple(tensor.shape)}"
                )
            return tensor
        block = self.to_block(tensor)
        return block if self.stacked else block.unsqueeze(0)

    def from_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A ``(rows, *block_shape)`` tensor back in the parameter's shape (held rows: as is)."""
        if self.held_rows:
            return tensor
        return self.from_block(tensor if self.stacked else tensor.squeeze(0))

    def holding(self, rows: tuple[int, ...]) -> BlockSpec:
        """The spec of a rank that holds only the blocks ``rows`` (sorted) of the parameter."""
        if not rows or list(rows) != sorted(set(rows)) or rows[-1] >= self.full_rows:
            raise ValueError(
                f"held rows must be distinct, sorted and below {self.full_rows}, got {rows}"
            )
        return replace(self, held_rows=tuple(rows))

    def whole(self) -> BlockSpec:
        """The spec of the whole parameter (every row)."""
        return replace(self, held_rows=())

    def padding(self) -> list[torch.Tensor | None]:
        """Per block dim, which indices of each row's block are padding, ``(rows, d)`` bool.

        None for a dim without padding (every dim of an unblocked parameter).
        """
        masks: list[torch.Tensor | None] = []
        for dim, size in enumerate(self.block_shape):
            if not self.grid or self.grid[dim] * size == self.merged_shape[dim]:
                masks.append(None)
                continue
            index = torch.arange(self.grid[dim] * size).view(self.grid[dim], size)
            per_block = index >= self.merged_shape[dim]  # (grid[dim], size)
            shape = [1] * len(self.grid)
            shape[dim] = self.grid[dim]
            per_row = per_block.view(*shape, size).expand(*self.grid, size).reshape(-1, size)
            mask = per_row.repeat(math.prod(self.stack_shape), 1)
            masks.append(mask[list(self.held_rows)] if self.held_rows else mask)
        return masks


def make_block_spec(
    shape: tuple[int, ...] | torch.Size,
    *,
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
    data_format: str,
    stack_dims: int = 0,
    one_sided: bool = False,
    block_size: int | None = None,
) -> BlockSpec:
    """Describe how SOAP preconditions a parameter of the given shape.

    Args:
        shape: the parameter's shape.
        max_precond_dim: dims larger than this get no factor (identity rotation on that side).
        merge_dims: merge adjacent small dims first (see :func:`merge_shape`).
        precondition_1d: give 1-D parameters a factor too (else they are plain Adam).
        data_format: ``"channels_first"`` or ``"channels_last"``; the latter permutes 4-D
            parameters NHWC -> NCHW before merging (only when ``merge_dims`` is set, as in the
            reference implementation).
        stack_dims: leading dims of ``shape`` that index independent matrices; the rules above
            apply to the remaining dims, of which there must be at least one.
        one_sided: of the factored dims, keep only the smallest (the first of equal ones): the
            SOAP paper's one-sided variant, the other dims left unrotated.
        block_size: cut every dim larger than this (after merging) into the fewest blocks of at
            most this size, of equal size, the last zero-padded (a dim of 1000 with 256: 4
            blocks of 250); each block is its own SOAP block. None: no blocking. 1-D
            parameters are blocked only with ``precondition_1d``.

    Returns:
        The block spec.

    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    shape = tuple(int(d) for d in shape)
    if stack_dims:
        if len(shape) <= stack_dims:
            raise ValueError(
                f"stack_dims={stack_dims} needs parameters with more than {stack_dims} dims "
                f"(leading stack dims, then the matrix), got shape {shape}"
            )
        inner = make_block_spec(
            shape[stack_dims:],
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            data_format=data_format,
            one_sided=one_sided,
            block_size=block_size,
        )
        return replace(inner, param_shape=shape, stack_shape=shape[:stack_dims])
    channels_last = False
    if len(shape) == 1:
        block_shape = shape
    else:
        block_shape = shape
        if merge_dims and len(shape) >= 2:
            if data_format == "channels_last" and len(shape) == 4:
                channels_last = True
                block_shape = (shape[0], shape[3], shape[1], shape[2])
            block_shape = merge_shape(block_shape, max_precond_dim)
    grid: tuple[int, ...] = ()
    merged_shape: tuple[int, ...] = ()
    if block_size is not None and (len(shape) > 1 or precondition_1d):
        grid = tuple(max(1, -(-d // block_size)) for d in block_shape)
        if math.prod(grid) > 1:
            merged_shape = block_shape
            block_shape = tuple(-(-d // g) for d, g in zip(block_shape, grid, strict=True))
        else:
            grid = ()
    if len(shape) == 1:
        factored = (precondition_1d and block_shape[0] <= max_precond_dim,)
    else:
        factored = tuple(d <= max_precond_dim for d in block_shape)
    if one_sided and sum(factored) > 1:
        smallest = min((d, i) for i, (d, f) in enumerate(zip(block_shape, factored)) if f)[1]
        factored = tuple(i == smallest for i in range(len(block_shape)))
    return BlockSpec(shape, channels_last, block_shape, factored, (), grid, merged_shape)


def split_blocks(
    matrices: torch.Tensor, grid: tuple[int, ...], block_shape: tuple[int, ...]
) -> torch.Tensor:
    """``(M, *merged)`` matrices cut into a grid of blocks: ``(M * prod(grid), *block_shape)``.

    Each dim is zero-padded at its end to ``grid * block`` first; blocks are ordered matrix by
    matrix, then row-major over the grid.
    """
    pad = []
    for dim in reversed(range(len(grid))):
        pad += [0, grid[dim] * block_shape[dim] - matrices.shape[1 + dim]]
    if any(pad):
        matrices = torch.nn.functional.pad(matrices, pad)
    k = len(grid)
    interleaved = [n for g, b in zip(grid, block_shape, strict=True) for n in (g, b)]
    order = [0, *(1 + 2 * i for i in range(k)), *(2 + 2 * i for i in range(k))]
    blocks = matrices.reshape(matrices.shape[0], *interleaved).permute(order)
    return blocks.reshape(-1, *block_shape)


def join_blocks(
    blocks: torch.Tensor,
    grid: tuple[int, ...],
    block_shape: tuple[int, ...],
    merged_shape: tuple[int, ...],
) -> torch.Tensor:
    """The inverse of :func:`split_blocks`: ``(M, *merged_shape)``, the padding dropped."""
    k = len(grid)
    whole = blocks.reshape(-1, *grid, *block_shape)
    order = [0] + [n for i in range(k) for n in (1 + i, 1 + k + i)]
    padded = whole.permute(order).reshape(-1, *(g * b for g, b in zip(grid, block_shape)))
    return padded[(slice(None), *(slice(0, m) for m in merged_shape))]


def layout_signature(spec: BlockSpec) -> str:
    """A short text naming a block's state layout, stored with its state and checked on load."""
    if spec.stacked:
        stack = f"stack_shape={spec.stack_shape} " if spec.stack_shape else ""
        grid = f"grid={spec.grid} " if spec.blocked else ""
        held = f" rows={_ranges(spec.held_rows)}" if spec.held_rows else ""
        return f"{stack}{grid}block_shape={spec.block_shape} factored={spec.factored}{held}"
    return f"block_shape={spec.block_shape} factored={spec.factored}"


def _ranges(rows: tuple[int, ...]) -> str:
    """Sorted row indices as compact ranges: ``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    parts, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            first, last = rows[start], rows[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)
