"""``elementwise=``: each named implementation is the one that runs, and they agree.

On CPU the Triton kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by this
folder's conftest), so the forced ``"triton"`` path is held to the torch reference here too.
"""

import pytest
import torch
from distsoap.kernels import compiled_rotated_adam_direction, rotated_adam_direction_torch

from distsoap import SOAP
from distsoap.engine import elementwise as elementwise_module
from tests.problems import RegressionProblem, relative_difference, train

pytest.importorskip("triton")  # the [triton] extra; installed by the dev setup


def test_each_name_selects_its_implementation():
    param = torch.nn.Parameter(torch.randn(4, 4))
    assert SOAP([param], elementwise="torch").engine.elementwise is rotated_adam_direction_torch
    compiled = SOAP([param], elementwise="compile").engine.elementwise
    assert compiled is compiled_rotated_adam_direction
    forced = SOAP([param], elementwise="triton").engine.elementwise
    assert forced is elementwise_module.rotated_adam_direction_triton_only


def test_forced_triton_matches_the_torch_reference():
    problem = RegressionProblem([(16, 16), (16, 8), (8, 6, 3, 3), (32,)])
    reference = train(problem, lambda ps: SOAP(ps, lr=1e-2, elementwise="torch"), 8)
    forced = train(problem, lambda ps: SOAP(ps, lr=1e-2, elementwise="triton"), 8)
    # fp32: the kernel and torch round the same formula in a different order (the kernel test
    # holds one call to rtol 2e-6); eight steps with two refreshes keep that well below 1e-5
    assert relative_difference(forced, reference) < 1e-5
    assert relative_difference(forced, problem.make_params(None)) > 1e-3  # it trained


def test_forced_triton_refuses_fp64_blocks():
    param = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    opt = SOAP([param], elementwise="triton")
    param.grad = torch.randn_like(param)
    opt.step()  # the first call: bases only, no elementwise update
    param.grad = torch.randn_like(param)
    with pytest.raises(RuntimeError, match="elementwise='triton' runs fp32 math"):
        opt.step()


def test_forced_triton_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    param = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([param], elementwise="triton")
    param.grad = torch.randn_like(param)
    opt.step()  # the first call: bases only, no elementwise update
    param.grad = torch.randn_like(param)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        opt.step()
