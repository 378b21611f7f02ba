"""``import distsoap.integrations.torchtitan`` teaches torchtitan's container the name "SOAP"."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan")  # installed by the dev setup (scripts/setup_env.sh)

from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig  # noqa: E402

from distsoap import SOAP  # noqa: E402
from distsoap.integrations import torchtitan as integration  # noqa: E402


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_default_soap_builds_soap_with_torchtitans_groups():
    container = integration.default_soap(lr=1e-3, precondition_frequency=5).build(
        model_parts=[_model()]
    )
    (soap,) = container.optimizers
    assert isinstance(soap, SOAP)
    (group,) = soap.param_groups
    assert group["lr"] == 1e-3 and group["precondition_frequency"] == 5
    assert group["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert "fused" not in group and "foreach" not in group  # AdamW's kernel switches dropped


def test_mixed_groups_and_factory_options():
    config = OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r"bias$", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2}
            ),
            ParamGroupConfig(pattern=r".*", optimizer_name="SOAP", optimizer_kwargs={"lr": 3e-3}),
        ],
        optimizer_factory_kwargs_by_name={"SOAP": {"refresh_schedule": "staggered"}},
    )
    container = config.build(model_parts=[_model()])
    by_type = {type(o).__name__: o for o in container.optimizers}
    assert set(by_type) == {"AdamW", "SOAP"}
    assert by_type["SOAP"].refresh_schedule == "staggered"
    assert [len(g["params"]) for g in by_type["SOAP"].param_groups] == [2]  # the weights


def test_registering_twice_keeps_other_names():
    integration.register()
    integration.register()
    assert OptimizersContainer._resolve_optimizer_factory("SOAP") is integration.build_soap
    assert OptimizersContainer._resolve_optimizer_factory("AdamW") is torch.optim.AdamW
    with pytest.raises(NotImplementedError):
        OptimizersContainer._resolve_optimizer_factory("Lion")


# torchtitan's command line as launch/torchtitan/run.sh gives it, in a fresh interpreter. Its
# config registry imports torchtitan's trainer, data and logging modules, whose requirements
# (tensorboard, torchdata, datasets) the dev setup leaves out: the few names those modules import
# from them get placeholders there, in that interpreter only (none is used to build a config).
_PARSE_RUN_SH_ARGUMENTS = """
import importlib.util, json, sys, types

class Placeholder:
    pass

def placeholder(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module

missing = [name for name in ("tensorboard", "torchdata", "datasets")
           if importlib.util.find_spec(name) is None]
if "tensorboard" in missing:
    placeholder("torch.utils.tensorboard", SummaryWriter=Placeholder)
if "torchdata" in missing:
    placeholder("torchdata")
    placeholder("torchdata.stateful_dataloader", StatefulDataLoader=Placeholder)
if "datasets" in missing:
    placeholder("datasets", Dataset=Placeholder, load_dataset=None)
    placeholder("datasets.distributed", split_dataset_by_node=None)

import torch
from torchtitan.config import ConfigManager

config = ConfigManager().parse_args([
    "--module", "distsoap.integrations.torchtitan", "--config", "llama3_debugmodel_soap",
    "--training.steps", "7",
])
container = config.optimizer.build(model_parts=[torch.nn.Linear(4, 3)])
print(json.dumps(dict(
    config=type(config).__qualname__,
    model=[config.model_spec.name, config.model_spec.flavor],
    steps=config.training.steps,
    groups=[[g.pattern, g.optimizer_name, g.optimizer_kwargs["lr"]]
            for g in config.optimizer.param_groups],
    built=[type(o).__name__ for o in container.optimizers],
    placeholders=missing,
)))
"""


def test_llama3_debugmodel_soap_from_torchtitans_command_line():
    completed = subprocess.run(
        [sys.executable, "-c", _PARSE_RUN_SH_ARGUMENTS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    got = json.loads(completed.stdout.strip().splitlines()[-1])
    assert got["config"] == "Trainer.Config"
    assert got["model"] == ["llama3", "debugmodel"]  # torchtitan's debug config, kept
    assert got["steps"] == 7  # torchtitan's own options still apply
    assert got["groups"] == [[".*", "SOAP", 3e-3]]  # SOAP in place of AdamW
    assert got["built"] == ["SOAP"]


@pytest.mark.skipif(
    all(importlib.util.find_spec(name) for name in ("tensorboard", "torchdata", "datasets")),
    reason="torchtitan's full requirements are installed",
)
def test_llama3_debugmodel_soap_names_what_is_missing():
    with pytest.raises(ImportError, match="datasets, torchdata, tensorboard"):
        integration.llama3_debugmodel_soap()
