"""SOAP's hyperparameters: the reference's names and defaults, and their valid ranges."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from distsoap.engine.blocks import DATA_FORMATS

# Names and defaults of the public reference implementation (docs/algorithm.md), so that replacing
# its import with distsoap's is enough.
DEFAULTS: dict[str, Any] = {
    "lr": 3e-3,
    "betas": (0.95, 0.95),
    "shampoo_beta": -1,
    "eps": 1e-8,
    "weight_decay": 0.01,
    "precondition_frequency": 10,
    "max_precond_dim": 10000,
    "merge_dims": False,
    "precondition_1d": False,
    "normalize_grads": False,
    "correct_bias": True,
}

_BOOLEAN_KEYS = ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite_nonnegative(value: Any) -> bool:
    return _is_real(value) and 0 <= value < math.inf  # NaN fails both comparisons


def _is_valid_lr(lr: Any) -> bool:
    """A finite real >= 0, or a 1-element floating-point tensor holding one (as torch's Adam)."""
    if isinstance(lr, torch.Tensor):
        usable = lr.numel() == 1 and lr.is_floating_point() and not lr.is_meta
        return usable and _is_finite_nonnegative(float(lr))
    return _is_finite_nonnegative(lr)


def hyperparameter_text(value: Any) -> str:
    """A hyperparameter as text that ranks compare: ``repr``, tensors by their values.

    A tensor's repr rounds (``tensor(0.0100)`` for 0.01 and 0.0100001) and names its device
    (each rank's own ``cuda:N``); its values in full and its dtype are what must agree.
    """
    if isinstance(value, torch.Tensor):
        return f"tensor({value.detach().cpu().tolist()!r}, {value.dtype})"
    return repr(value)


def group_lr(group: dict[str, Any]) -> float:
    """The group's learning rate as a float (``lr`` may be a 1-element tensor)."""
    return float(group["lr"])


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_data_format(data_format: Any) -> None:
    """Raise ValueError unless ``data_format`` is one of the two supported layouts."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")


def validate_group(group: dict[str, Any], data_format: str = "channels_first") -> None:
    """Check one param group's hyperparameters; raise ValueError naming the valid range.

    Args:
        group: a param group (hyperparameters and ``params``).
        data_format: the optimizer-wide data format.

    """
    validate_data_format(data_format)
    lr = group["lr"]
    if not _is_valid_lr(lr):
        raise ValueError(
            "lr must be a real number >= 0 and finite (or a 1-element floating-point tensor "
            f"holding one), got {lr!r}"
        )
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    for name, beta in zip(("beta1", "beta2"), betas, strict=True):
        if not _is_real(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    shampoo_beta = group["shampoo_beta"]
    if not _is_real(shampoo_beta) or not shampoo_beta < 1.0:
        raise ValueError(
            f"shampoo_beta must be in [0, 1), or negative to use beta2, got {shampoo_beta!r}"
        )
    eps = group["eps"]
    if not _is_finite_nonnegative(eps):
        raise ValueError(f"eps must be a real number >= 0 and finite, got {eps!r}")
    weight_decay = group["weight_decay"]
    if not _is_finite_nonnegative(weight_decay):
        raise ValueError(
            f"weight_decay must be a real number >= 0 and finite, got {weight_decay!r}"
        )
    frequency = group["precondition_frequency"]
    if not _is_int(frequency) or frequency < 1:
        raise ValueError(f"precondition_frequency must be an integer >= 1, got {frequency!r}")
    max_dim = group["max_precond_dim"]
    if not _is_int(max_dim) or max_dim < 1:
        raise ValueError(f"max_precond_dim must be an integer >= 1, got {max_dim!r}")
    for key in _BOOLEAN_KEYS:
        if not isinstance(group[key], bool):
            raise ValueError(f"{key} must be True or False, got {group[key]!r}")
    maximize = group.get("maximize", False)  # torch's name; the reference has no such option
    if not isinstance(maximize, bool):
        raise ValueError(f"maximize must be True or False, got {maximize!r}")
    tolerance = group.get("refresh_tolerance", 0.0)  # distsoap's own, as the keys below
    if not _is_finite_nonnegative(tolerance):
        raise ValueError(
            f"refresh_tolerance must be a real number >= 0 and finite (0: never skip a "
            f"refresh), got {tolerance!r}"
        )
    max_skips = group.get("max_skipped_refreshes", 4)
    if not _is_int(max_skips) or max_skips < 0:
        raise ValueError(f"max_skipped_refreshes must be an integer >= 0, got {max_skips!r}")
    block_size = group.get("block_size")
    if block_size is not None and (not _is_int(block_size) or block_size < 1):
        raise ValueError(
            f"block_size must be None (no blocking) or an integer >= 1, got {block_size!r}"
        )
    one_sided = group.get("one_sided", False)
    if not isinstance(one_sided, bool):
        raise ValueError(f"one_sided must be True or False, got {one_sided!r}")
    stack_dims = group.get("stack_dims", 0)  # distsoap's own: leading dims of matrix stacks
    if not _is_int(stack_dims) or stack_dims < 0:
        raise ValueError(
            f"stack_dims must be an integer >= 0 (leading dims that index independent "
            f"matrices, e.g. 1 for MoE experts stored as (num_experts, d_in, d_out)), got "
            f"{stack_dims!r}"
        )


def validate_params(group: dict[str, Any], group_index: int) -> None:
    """Refuse parameters SOAP cannot optimise: integer or bool dtypes, and the meta device.

    Complex parameters are refused at the first step (see ``check_gradient``).

    Raises:
        ValueError: naming the parameter (group and position, name when given, shape) and
            what is wrong with it.
    """
    names = group.get("param_names") or []
    for index, param in enumerate(group["params"]):
        where = f"param_groups[{group_index}]['params'][{index}]"
        if index < len(names):
            where += f" ({names[index]!r})"
        where += f" of shape {tuple(param.shape)}"
        if not (param.is_floating_point() or param.is_complex()):
            raise ValueError(
                f"{where} has dtype {param.dtype}: SOAP optimises floating-point parameters "
                "(float32, bfloat16, float16, float64); leave integer and bool tensors out "
                "of the optimizer"
            )
        stack_dims = group.get("stack_dims", 0)
        if stack_dims and param.dim() <= stack_dims:
            raise ValueError(
                f"{where} has {param.dim()} dims, but its group has stack_dims={stack_dims}: "
                f"a stack needs more than {stack_dims} dims (the stack dims, then at least one "
                "dim of each matrix); put it in a param group with a smaller stack_dims"
            )
        if param.is_meta:
            raise ValueError(
                f"{where} is on the meta device (no data, dtype {param.dtype}): create the "
                "optimizer after materialising the model (to_empty() and initialisation), "
                "where SOAP's state can live"
            )


def resolved_shampoo_beta(group: dict[str, Any]) -> float:
    """The factor EMA coefficient: ``shampoo_beta``, or beta2 when it is negative."""
    shampoo_beta = group["shampoo_beta"]
    return float(shampoo_beta if shampoo_beta >= 0 else group["betas"][1])


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(value: torch.dtype | str | None, name: str) -> torch.dtype | None:
    """A dtype given as a ``torch.dtype`` or by name (``"bf16"``, ``"float32"``; JSON configs).

    Raises:
        ValueError: for a name that is not one of the known ones.
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.removeprefix("torch.")]
    raise ValueError(
        f"{name} must be a torch.dtype or one of {sorted(_DTYPE_NAMES)}, got {value!r}"
    )
