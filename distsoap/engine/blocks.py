"""Blocks: how SOAP sees one parameter.

A *block* is a parameter tensor as the preconditioner sees it: optionally permuted (channels_last
4-D tensors become NCHW) and with adjacent small dims merged (``merge_dims``). Each block dim of
size <= ``max_precond_dim`` is *factored*: it gets a Kronecker factor and an eigenbasis; larger
dims are left unrotated. The rules follow docs/algorithm.md ("Shapes").

A param group's ``one_sided`` (default False) keeps only the smallest factored dim of each block
(the SOAP paper's one-sided variant: the memory and refresh cost of the larger side saved).

A param group's ``stack_dims`` (default 0) makes a parameter's leading dims index a *stack* of
independent matrices (MoE experts stored as ``(num_experts, d_in, d_out)``): the rules above
apply to the trailing dims, and every matrix of the stack gets its own factors and bases, as if
it were a parameter of its own. Such a block is stored as rows: ``(rows, *block_shape)``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """The layout of one parameter as a SOAP block.

    Attributes:
        param_shape: shape of the parameter (and of its gradient).
        channels_last: the 4-D parameter is stored NHWC and is permuted to NCHW before merging.
        block_shape: shape after the permutation and merging; moments are stored in this shape.
        factored: one flag per block dim: True when that dim has a factor and an eigenbasis.
        stack_shape: the parameter's leading dims that index independent matrices (empty: the
            parameter is one block).

    """

    param_shape: tuple[int, ...]
    channels_last: bool
    block_shape: tuple[int, ...]
    factored: tuple[bool, ...]
    stack_shape: tuple[int, ...] = ()

    @property
    def stacked(self) -> bool:
        """The parameter is a stack of independent matrices (its state has a leading row dim)."""
        return bool(self.stack_shape)

    @property
    def rows(self) -> int:
        """Number of independent blocks: the product of the stack dims (1 when not stacked)."""
        n = 1
        for d in self.stack_shape:
            n *= d
        return n

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
        """Number of elements of the block (equal to the parameter's)."""
        n = 1
        for d in self.param_shape:
            n *= d
        return n

    def to_block(self, tensor: torch.Tensor) -> torch.Tensor:
        """View (or copy, if the layout demands it) a parameter-shaped tensor as a block.

        A stacked parameter gives ``(rows, *block_shape)``.
        """
        if self.channels_last:
            lead = len(self.stack_shape)
            tensor = tensor.permute(*range(lead), lead, lead + 3, lead + 1, lead + 2)
        return tensor.reshape(self.state_shape)

    def from_block(self, tensor: torch.Tensor) -> torch.Tensor:
        """Bring a block-shaped tensor back to the parameter's shape (a view where possible)."""
        if self.channels_last:
            lead = len(self.stack_shape)
            n, h, w, c = self.param_shape[lead:]
            tensor = tensor.reshape(*self.stack_shape, n, c, h, w)
            return tensor.permute(*range(lead), lead, lead + 2, lead + 3, lead + 1)
        return tensor.reshape(self.param_shape)

    def to_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A parameter-shaped tensor as ``(rows, *block_shape)`` (one row when not stacked)."""
        block = self.to_block(tensor)
        return block if self.stacked else block.unsqueeze(0)

    def from_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A ``(rows, *block_shape)`` tensor back in the parameter's shape."""
        return self.from_block(tensor if self.stacked else tensor.squeeze(0))


def make_block_spec(
    shape: tuple[int, ...] | torch.Size,
    *,
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
    data_format: str,
    stack_dims: int = 0,
    one_sided: bool = False,
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
        )
        return BlockSpec(
            shape, inner.channels_last, inner.block_shape, inner.factored, shape[:stack_dims]
        )
    channels_last = False
    if len(shape) == 1:
        block_shape = shape
        factored = (precondition_1d and shape[0] <= max_precond_dim,)
    else:
        block_shape = shape
        if merge_dims and len(shape) >= 2:
            if data_format == "channels_last" and len(shape) == 4:
                channels_last = True
                block_shape = (shape[0], shape[3], shape[1], shape[2])
            block_shape = merge_shape(block_shape, max_precond_dim)
        factored = tuple(d <= max_precond_dim for d in block_shape)
    if one_sided and sum(factored) > 1:
        smallest = min((d, i) for i, (d, f) in enumerate(zip(block_shape, factored)) if f)[1]
        factored = tuple(i == smallest for i in range(len(block_shape)))
    return BlockSpec(shape, channels_last, block_shape, factored)


def layout_signature(spec: BlockSpec) -> str:
    """A short text naming a block's state layout, stored with its state and checked on load."""
    if spec.stacked:
        stack = f"stack_shape={spec.stack_shape} "
        return f"{stack}block_shape={spec.block_shape} factored={spec.factored}"
    return f"block_shape={spec.block_shape} factored={spec.factored}"
