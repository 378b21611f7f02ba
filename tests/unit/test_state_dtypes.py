"""convert_block_state: saved SOAP state in the dtypes the loading optimizer allocates."""

import pytest
import torch

from distsoap import SOAP
from distsoap.checkpointing.state_dtypes import convert_block_state
from tests.problems import RegressionProblem, relative_difference

SHAPES = [(16, 16), (12, 40), (32,)]
KWARGS = dict(lr=1e-2, precondition_frequency=3, max_precond_dim=32)
TENSOR_KEYS = ("exp_avg", "exp_avg_sq", "factor_0", "basis_0", "factor_1", "basis_1")


def _run(problem, opt, params, start, stop):
    for step in range(start, stop):
        opt.zero_grad(set_to_none=True)
        problem.loss(params, step).backward()
        opt.step()


def _trained(dtype, steps=5, **kwargs):
    problem = RegressionProblem(SHAPES, dtype=dtype)
    params = problem.make_params()
    opt = SOAP(params, **KWARGS, **kwargs)
    _run(problem, opt, params, 0, steps)
    return problem, params, opt


@pytest.mark.parametrize(
    "saved_dtype, param_dtype, moment_dtype, want_moments, want_factors",
    [
        (torch.float32, torch.float64, torch.float32, torch.float64, torch.float64),
        (torch.float64, torch.float32, torch.float32, torch.float32, torch.float32),
        (torch.float64, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.float32),
    ],
    ids=["fp32->fp64", "fp64->fp32", "fp64->bf16 params, bf16 moments", "bf16->fp32"],
)
def test_every_state_tensor_gets_the_dtype_soap_allocates(
    saved_dtype, param_dtype, moment_dtype, want_moments, want_factors
):
    _, params, opt = _trained(saved_dtype)
    saved = opt.state[params[0]]
    target = torch.nn.Parameter(torch.zeros(16, 16, dtype=param_dtype))
    loader = SOAP([target], moment_dtype=moment_dtype)

    converted = convert_block_state(loader, target, saved)

    assert set(converted) == set(saved)
    for key in TENSOR_KEYS:
        want = want_moments if key.startswith("exp_avg") else want_factors
        assert converted[key].dtype == want, key
        # widening is exact; narrowing rounds as .to() does
        assert torch.equal(converted[key], saved[key].to(want))
    for key, value in saved.items():
        if not isinstance(value, torch.Tensor):
            assert converted[key] is value  # step, bases_ready, block_layout, ... as saved


@pytest.mark.parametrize("saved, loading", [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_moments_follow_the_loading_optimizers_moment_dtype(saved, loading):
    """A checkpoint saved with another moment_dtype is converted, not kept as saved."""
    _, params, opt = _trained(torch.float32, moment_dtype=saved)
    loader = SOAP([params[0]], moment_dtype=loading)
    converted = convert_block_state(loader, params[0], opt.state[params[0]])
    for key in ("exp_avg", "exp_avg_sq"):
        assert converted[key].dtype == getattr(torch, loading)
    assert converted["factor_0"].dtype == torch.float32


def test_rank_suffixed_keys_and_unknown_entries():
    param = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
    loader = SOAP([param])
    extra = torch.ones(2, dtype=torch.float16)
    saved = {
        "exp_avg@rank1": torch.zeros(4, 4),
        "basis_1@rank1": torch.eye(4),
        "extra": extra,
        "step": 3,
    }
    converted = convert_block_state(loader, param, saved)
    assert converted["exp_avg@rank1"].dtype == torch.float64
    assert converted["basis_1@rank1"].dtype == torch.float64
    assert converted["extra"] is extra  # not a SOAP state tensor: left alone
    assert converted["step"] == 3


@pytest.mark.parametrize(
    "saved_dtype, loaded_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_converted_state_steps_on(saved_dtype, loaded_dtype):
    """fp32 state in fp64 parameters (and back) steps once converted, close to the original."""
    problem, params, opt = _trained(saved_dtype)
    saved = opt.state_dict()
    loaded = [torch.nn.Parameter(p.detach().to(loaded_dtype)) for p in params]
    fresh = SOAP(loaded, **KWARGS)
    fresh.load_state_dict(saved)
    for p in loaded:  # what load_state will do with convert_block_state
        fresh.state[p] = convert_block_state(fresh, p, fresh.state[p])
    fresh.engine.reset()

    _run(problem, fresh, loaded, 5, 9)  # through a refresh (every 3 updates)
    _run(problem, opt, params, 5, 9)
    for p in loaded:
        tensors = [v for v in fresh.state[p].values() if isinstance(v, torch.Tensor)]
        assert all(t.dtype == loaded_dtype for t in tensors)
    # the runs differ only by fp32 rounding over 4 steps from identical state
    assert relative_difference(loaded, params) < 1e-4
