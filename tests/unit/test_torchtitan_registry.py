"""``import distsoap.integrations.torchtitan`` teaches torchtitan's container the name "SOAP"."""

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
