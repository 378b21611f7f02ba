"""What the planner is asked: the strategy, the number of ranks and SOAP's layout options."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from distsoap.engine.blocks import DATA_FORMATS
from distsoap.hyperparams import DEFAULTS
from distsoap.placement import SPLIT_BLOCKS

STRATEGIES = ("single", "ddp", "zero2", "fsdp2", "fsdp2_local")
"""The strategies the planner models (``fsdp1`` and DeepSpeed are not modelled)."""

STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""Storage dtypes the planner accepts for moments, factors and bases."""

DEFAULT_STACK_PATTERN = r"(^|\.)experts(\.|$)"
"""Names of the parameters ``stack_dims`` applies to: torchtitan's grouped experts."""


class PlanError(ValueError):
    """A request the planner cannot answer (unknown model, bad option); the message says why."""


@dataclass(frozen=True)
class PlanOptions:
    """The run to plan: how parameters are spread and how SOAP lays out their state.

    The layout options mean what the :class:`distsoap.SOAP` options of the same names mean.
    """

    strategy: str = "fsdp2"
    """One of :data:`STRATEGIES`, as ``SOAP(strategy=...)``."""
    world: int = 1
    """Number of ranks the strategy shards over."""
    max_precond_dim: int = DEFAULTS["max_precond_dim"]
    """Block dims larger than this get no factor and no basis."""
    merge_dims: bool = DEFAULTS["merge_dims"]
    """Merge adjacent small dims before preconditioning."""
    precondition_1d: bool = DEFAULTS["precondition_1d"]
    """Give 1-D parameters a factor too."""
    one_sided: bool = False
    """Keep only the smallest factored dim of each block."""
    block_size: int | None = None
    """Cut dims larger than this into blocks, each its own SOAP block (None: no blocking)."""
    data_format: str = "channels_first"
    """How 4-D parameters are blocked (``channels_last``: permuted NHWC -> NCHW)."""
    moment_dtype: torch.dtype = torch.float32
    """Storage dtype of ``exp_avg`` and ``exp_avg_sq``."""
    factor_dtype: torch.dtype = torch.float32
    """Storage dtype of the Kronecker factors."""
    basis_dtype: torch.dtype = torch.float32
    """Storage dtype of the eigenbases."""
    precondition_frequency: int = DEFAULTS["precondition_frequency"]
    """Refresh interval of the eigenbases, in steps."""
    refresh_tolerance: float = 0.0
    """The adaptive refresh's tolerance (> 0: a due refresh may be skipped; 0: never)."""
    max_skipped_refreshes: int = 4
    """The adaptive refresh's bound on consecutive skipped refreshes of a block."""
    stack_dims: int = 0
    """Leading dims of the parameters named by ``stack_pattern`` that index a stack of matrices."""
    stack_pattern: str = DEFAULT_STACK_PATTERN
    """Regular expression (``re.search``) on parameter names: the ``stack_dims`` param group."""
    param_dtype: torch.dtype | None = None
    """Dtype of every parameter (None: as the model was built); fp64 parameters keep fp64 state."""
    split_blocks: str = "auto"
    """``"auto"``: a parameter's blocks may get several owners where needed; ``"never"``."""

    def __post_init__(self) -> None:
        """Check every option; a :class:`PlanError` names the first bad one."""
        if self.strategy not in STRATEGIES:
            raise PlanError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("world", "max_precond_dim", "precondition_frequency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{name} must be an integer >= 1, got {value!r}")
        size = self.block_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise PlanError(f"block_size must be None or an integer >= 1, got {size!r}")
        tolerance = self.refresh_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
            raise PlanError(f"refresh_tolerance must be a real number >= 0, got {tolerance!r}")
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise PlanError(f"refresh_tolerance must be a real number >= 0, got {tolerance!r}")
        skips = self.max_skipped_refreshes
        if isinstance(skips, bool) or not isinstance(skips, int) or skips < 0:
            raise PlanError(f"max_skipped_refreshes must be an integer >= 0, got {skips!r}")
        if isinstance(self.stack_dims, bool) or not isinstance(self.stack_dims, int):
            raise PlanError(f"stack_dims must be an integer >= 0, got {self.stack_dims!r}")
        if self.stack_dims < 0:
            raise PlanError(f"stack_dims must be an integer >= 0, got {self.stack_dims!r}")
        if self.split_blocks not in SPLIT_BLOCKS:
            raise PlanError(
                f"split_blocks must be one of {SPLIT_BLOCKS}, got {self.split_blocks!r}"
            )
        if self.data_format not in DATA_FORMATS:
            raise PlanError(f"data_format must be one of {DATA_FORMATS}, got {self.data_format!r}")
        for name in ("moment_dtype", "factor_dtype", "basis_dtype"):
            if getattr(self, name) not in STATE_DTYPES:
                raise PlanError(f"{name} must be one of {STATE_DTYPES}, got {getattr(self, name)}")
        if self.param_dtype is not None and not self.param_dtype.is_floating_point:
            raise PlanError(f"param_dtype must be a floating-point dtype, got {self.param_dtype}")
        try:
            re.compile(self.stack_pattern)
        except re.error as error:
            raise PlanError(f"stack_pattern is not a regular expression: {error}") from None

    @property
    def skip_bound(self) -> int | None:
        """``max_skipped_refreshes`` with the adaptive refresh on; None with it off."""
        return self.max_skipped_refreshes if self.refresh_tolerance > 0 else None

    def element_bytes(self, param_dtype: torch.dtype) -> tuple[int, int, int]:
        """Bytes per element of a parameter's moments, factors and bases.

        The optimizer's rule: fp64 parameters keep all their state in fp64; other parameters
        use the chosen storage dtypes.
        """
        if param_dtype == torch.float64:
            return 8, 8, 8
        return self.moment_dtype.itemsize, self.factor_dtype.itemsize, self.basis_dtype.itemsize
