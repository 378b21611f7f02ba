"""``python -m distsoap.plan``: SOAP's optimizer state per rank, planned on the meta device.

Exit status 0 on success, 2 for a bad request (unknown model, bad option), with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from distsoap.hyperparams import parse_dtype
from distsoap.placement import SPLIT_BLOCKS
from distsoap.plan.models import PRESETS, build_model
from distsoap.plan.options import DEFAULT_STACK_PATTERN, STRATEGIES, PlanError, PlanOptions
from distsoap.plan.planner import plan
from distsoap.plan.report import as_json, table

EPILOG = "models:\n" + "\n".join(f"  {name:<12} {text}" for name, (text, _) in PRESETS.items())
EPILOG += """
  PATH.py      a file defining build_model() -> nn.Module (called under torch.device("meta"))

The table shows, per rank, the max, mean and min over ranks and the total of each quantity
(each row on its own); "SOAP / AdamW" divides the SOAP row by the AdamW row, column by column.
Refresh FLOPs are modelled (distsoap/plan/costs.py): (14/3) d^3 per factored dim of size d per
matrix and refresh, divided by the precondition frequency; "on a refresh step" is the step on
which, under the default aligned schedule, every block refreshes. With --refresh-tolerance > 0,
"fewest (adaptive)" is the least the adaptive refresh can bring the per-step figure to: a skip
still costs the 2 d^3 product, and at most --max-skipped-refreshes skips in a row. Under fsdp2,
"split exchange / step" is what each rank sends per step for the round trip of the rows of
parameters whose blocks have several owners (--split-blocks never: none is split)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option; the epilog kept as written."""


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _dtype(text: str):
    """An argparse type: a dtype by name (fp32, bf16, fp16, fp64, float32, ...)."""
    try:
        return parse_dtype(text, "dtype")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def make_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(
        prog="python -m distsoap.plan",
        description="SOAP optimizer state per rank (moments, factors, bases), eigenbasis "
        "refresh FLOPs per step, and AdamW's state for the same strategy. The model is built "
        "on the meta device: no memory is allocated.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a preset name or PATH.py (see below)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="fsdp2")
    parser.add_argument("--world", type=_positive_int, default=1, help="number of ranks")
    parser.add_argument(
        "--max-precond-dim", type=_positive_int, default=PlanOptions.max_precond_dim
    )
    parser.add_argument("--merge-dims", action="store_true")
    parser.add_argument("--precondition-1d", action="store_true")
    parser.add_argument(
        "--one-sided", action="store_true", help="rotate only the smallest dim of each block"
    )
    parser.add_argument(
        "--block-size", type=_positive_int, default=None, help="cut larger dims into blocks"
    )
    parser.add_argument(
        "--split-blocks",
        choices=SPLIT_BLOCKS,
        default="auto",
        help="whether a parameter's blocks may get several owners",
    )
    parser.add_argument("--channels-last", action="store_true", help="data_format=channels_last")
    for name in ("moment", "factor", "basis"):
        parser.add_argument(f"--{name}-dtype", type=_dtype, default="fp32", help="storage dtype")
    parser.add_argument(
        "--precondition-frequency", type=_positive_int, default=PlanOptions.precondition_frequency
    )
    parser.add_argument(
        "--refresh-tolerance",
        type=float,
        default=0.0,
        help="the adaptive refresh's tolerance (0: off)",
    )
    parser.add_argument(
        "--max-skipped-refreshes",
        type=int,
        default=PlanOptions.max_skipped_refreshes,
        help="the adaptive refresh's bound on consecutive skips",
    )
    parser.add_argument(
        "--stack-dims",
        type=int,
        default=0,
        help="leading dims of the --stack-pattern parameters that index matrices (MoE: 1)",
    )
    parser.add_argument(
        "--stack-pattern",
        default=DEFAULT_STACK_PATTERN,
        help="regular expression searched in parameter names: the --stack-dims group",
    )
    parser.add_argument(
        "--param-dtype",
        type=_dtype,
        default=None,
        help="dtype of every parameter (default: as built)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (errors exit 2 through argparse)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        options = PlanOptions(
            strategy=args.strategy,
            world=args.world,
            max_precond_dim=args.max_precond_dim,
            merge_dims=args.merge_dims,
            precondition_1d=args.precondition_1d,
            one_sided=args.one_sided,
            block_size=args.block_size,
            split_blocks=args.split_blocks,
            data_format="channels_last" if args.channels_last else "channels_first",
            moment_dtype=args.moment_dtype,
            factor_dtype=args.factor_dtype,
            basis_dtype=args.basis_dtype,
            precondition_frequency=args.precondition_frequency,
            refresh_tolerance=args.refresh_tolerance,
            max_skipped_refreshes=args.max_skipped_refreshes,
            stack_dims=args.stack_dims,
            stack_pattern=args.stack_pattern,
            param_dtype=args.param_dtype,
        )
        result = plan(build_model(args.model), options)
    except PlanError as error:
        parser.error(str(error))  # exits with status 2
    if args.json:
        print(json.dumps(as_json(result, args.model), indent=1))
    else:
        print(table(result, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
