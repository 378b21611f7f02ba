"""The memory planner: SOAP's optimizer state per rank, before a run, on the meta device.

``python -m distsoap.plan --model llama3-8b --strategy fsdp2 --world 64`` prints, per rank, the
bytes of SOAP's moments, factors and bases, the modelled eigenbasis-refresh FLOPs per step, and
AdamW's state for the same strategy. The same from Python::

    from distsoap.plan import PlanOptions, build_model, plan, table

    model = build_model("llama3-8b")  # on the meta device: no memory
    print(table(plan(model, PlanOptions(strategy="fsdp2", world=64)), "llama3-8b"))

Modules: :mod:`.options` (what is asked), :mod:`.models` (presets and model files),
:mod:`.costs` (one block's state and refresh FLOPs), :mod:`.planner` (placement over ranks),
:mod:`.report` (table and JSON), :mod:`.__main__` (the command line).
"""

from distsoap.plan.models import PRESETS, build_model
from distsoap.plan.options import STRATEGIES, PlanError, PlanOptions
from distsoap.plan.planner import Plan, RankPlan, param_groups, plan
from distsoap.plan.report import as_json, table

__all__ = [
    "PRESETS",
    "STRATEGIES",
    "Plan",
    "PlanError",
    "PlanOptions",
    "RankPlan",
    "as_json",
    "build_model",
    "param_groups",
    "plan",
    "table",
]
