"""The plan as a table (per rank: max, mean, min and the total over ranks) or as JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from distsoap.plan.options import PlanOptions
from distsoap.plan.planner import EVERY_RANK, SHARDED, SPLIT, Plan, RankPlan

ROWS: tuple[tuple[str, str, str], ...] = (
    ("SOAP state", "soap", "bytes"),
    ("  moments", "moments", "bytes"),
    ("  factors", "factors", "bytes"),
    ("  bases", "bases", "bytes"),
    ("AdamW state", "adamw", "bytes"),
    ("SOAP / AdamW", "ratio", "ratio"),
    ("refresh FLOP / step", "refresh_flops", "flops"),
    ("  on a refresh step", "refresh_peak", "flops"),
    ("  fewest (adaptive)", "refresh_flops_fewest", "flops"),
    ("blocks", "blocks", "count"),
    ("split exchange / step", "split_exchange", "bytes"),
)
"""(label, quantity, unit) of each table row (the adaptive row only with ``refresh_tolerance``,
the split exchange only under ``fsdp2``)."""


def _rows(options: PlanOptions) -> list[tuple[str, str, str]]:
    """The rows this plan shows.

    The adaptive refresh's bound only when it is on, the round trip of split parameters only
    where it exists.
    """
    return [
        r
        for r in ROWS
        if (r[1] != "refresh_flops_fewest" or options.skip_bound is not None)
        and (r[1] != "split_exchange" or options.strategy == "fsdp2")
    ]


_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DECIMAL = ("", "k", "M", "G", "T", "P", "E")


def dtype_name(dtype: torch.dtype | None) -> str:
    """``torch.bfloat16`` -> ``"bf16"``; None -> ``"as built"``."""
    if dtype is None:
        return "as built"
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, "fp64" if dtype == torch.float64 else str(dtype))


def _digits(value: float) -> str:
    """Three significant digits, never in exponent notation (1023.4 -> ``"1023"``)."""
    text = f"{value:.3g}"
    return f"{value:.0f}" if "e" in text else text


def format_count(value: float) -> str:
    """A count with a short-scale suffix: ``"8.03B"``, ``"124M"``."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{_digits(value / scale)}{suffix}"
    return _digits(value)


def format_bytes(value: float) -> str:
    """Bytes with a binary unit and three significant digits: ``"1.32 GiB"``."""
    unit = 0
    while abs(value) >= 1024 and unit < len(_BINARY) - 1:
        value /= 1024
        unit += 1
    return f"{value:.0f} B" if unit == 0 else f"{_digits(value)} {_BINARY[unit]}"


def format_flops(value: float) -> str:
    """FLOPs with a decimal prefix and three significant digits: ``"1.23 TFLOP"``."""
    unit = 0
    while abs(value) >= 1000 and unit < len(_DECIMAL) - 1:
        value /= 1000
        unit += 1
    return f"{_digits(value)} {_DECIMAL[unit]}FLOP"


def _quantity(rank: RankPlan, name: str, options: PlanOptions) -> float:
    if name == "soap":
        return rank.soap
    if name == "refresh_peak":  # aligned schedule: every block refreshes on the same step
        return rank.refresh_flops * options.precondition_frequency
    return getattr(rank, name)


def summary(plan: Plan) -> dict[str, dict[str, float]]:
    """Per quantity its max, mean and min over ranks, and its total (the ratio: of the columns).

    Each quantity is summarised on its own: the rank with the most moments need not be the
    rank with the most SOAP state. The ratio row divides the SOAP column by the AdamW column.
    """
    result: dict[str, dict[str, float]] = {}
    world = len(plan.ranks)
    for _, name, _ in _rows(plan.options):
        if name == "ratio":
            continue
        values = [_quantity(r, name, plan.options) for r in plan.ranks]
        result[name] = {
            "max": max(values),
            "mean": sum(values) / world,
            "min": min(values),
            "total": sum(values),
        }
    result["ratio"] = {
        column: result["soap"][column] / result["adamw"][column] if result["adamw"][column] else 0
        for column in ("max", "mean", "min", "total")
    }
    return result


def _cell(value: float, unit: str) -> str:
    if unit == "bytes":
        return format_bytes(value)
    if unit == "flops":
        return format_flops(value)
    if unit == "ratio":
        return f"{value:.2f}x"
    return f"{value:.3g}" if value != int(value) else str(int(value))


def options_lines(plan: Plan) -> list[str]:
    """The options that decide the layout, then the storage dtypes and the parameters' dtypes."""
    o = plan.options
    params = "/".join(sorted({dtype_name(p.dtype) for p in plan.params})) or "none"
    return [
        f"SOAP: max_precond_dim={o.max_precond_dim} merge_dims={o.merge_dims} "
        f"precondition_1d={o.precondition_1d} one_sided={o.one_sided} "
        f"block_size={o.block_size} stack_dims={o.stack_dims} "
        f"precondition_frequency={o.precondition_frequency}"
        + (
            f" refresh_tolerance={o.refresh_tolerance:g} "
            f"max_skipped_refreshes={o.max_skipped_refreshes}"
            if o.skip_bound is not None
            else ""
        ),
        f"state: moments {dtype_name(o.moment_dtype)}, factors {dtype_name(o.factor_dtype)}, "
        f"bases {dtype_name(o.basis_dtype)}; parameters {params}",
    ]


def table(plan: Plan, model_name: str) -> str:
    """The plan as a text table: a header, then one row per quantity.

    Args:
        plan: the plan.
        model_name: how to name the model in the header.
    """
    o = plan.options
    world = len(plan.ranks)
    holding = sum(1 for r in plan.ranks if r.soap > 0)
    stats = summary(plan)
    columns = ("max", "mean", "min", "total")
    lines = [
        f"{model_name}: {format_count(plan.numel)} trainable parameters in {len(plan.params)} "
        f"tensors; strategy {o.strategy}, {world} rank{'s' if world > 1 else ''} "
        f"({holding} holding SOAP state)",
        *options_lines(plan),
        "",
        f"{'per rank':<22}" + "".join(f"{c:>13}" for c in columns),
    ]
    for label, name, unit in _rows(o):
        cells = "".join(f"{_cell(stats[name][c], unit):>13}" for c in columns)
        lines.append(f"{label:<22}{cells}")
    return "\n".join(lines)


def _owner(owner: int) -> int | str:
    if owner == EVERY_RANK:
        return "every rank"
    if owner == SPLIT:
        return "split (per block)"
    return "per shard" if owner == SHARDED else owner


def as_json(plan: Plan, model_name: str) -> dict[str, Any]:
    """The plan as JSON-ready data: options, summary, every rank and every parameter."""
    options = {
        k: dtype_name(v) if isinstance(v, torch.dtype) or k == "param_dtype" else v
        for k, v in asdict(plan.options).items()
    }
    return {
        "model": model_name,
        "trainable_parameters": plan.numel,
        "tensors": len(plan.params),
        "options": options,
        "summary": summary(plan),
        "ranks": [{**asdict(r), "soap": r.soap} for r in plan.ranks],
        "params": [
            {
                "name": p.name,
                "shape": list(p.shape),
                "dtype": dtype_name(p.dtype),
                "stack_dims": p.stack_dims,
                "block_shape": list(p.spec.block_shape),
                "factor_dims": p.spec.factor_dims,
                "rows": p.spec.rows,
                "owner": _owner(p.owner),
                **asdict(p.state),
            }
            for p in plan.params
        ],
    }
