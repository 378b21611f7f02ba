"""SOAP (batched) against the readable per-parameter reference, trajectory by trajectory.

Problems are full rank from the first step (tests/problems.py), where a one-ulp perturbation of
every gradient moves parameters by <= 4e-6 after 50 steps (measured). Tolerances:
- fp32: 1e-4 relative after 50 steps (docs/algorithm.md; >= 20x the one-ulp sensitivity here);
- fp64: 1e-10 relative (the same sensitivity at fp64's ulp is ~1e-14).
"""

import pytest
import torch

from distsoap import SOAP, ReferenceSOAP
from tests.problems import RegressionProblem, relative_difference, train

FP32_TOL = 1e-4  # docs/algorithm.md: rounding differences amplified by early eigh, see module doc
FP64_TOL = 1e-10  # same amplification at fp64 rounding
STEPS = 50

CASES = {
    "matrix": ([(24, 24)], {}),
    "matrix_f3": ([(16, 16)], dict(precondition_frequency=3)),
    "conv4d": ([(8, 6, 3, 3)], {}),
    "conv4d_merged": ([(4, 4, 6, 6)], dict(merge_dims=True, max_precond_dim=16)),
    "conv4d_channels_last_merged": (
        [(4, 6, 6, 4)],
        dict(merge_dims=True, max_precond_dim=16, data_format="channels_last"),
    ),
    "conv4d_channels_last_unmerged": ([(8, 3, 3, 6)], dict(data_format="channels_last")),
    "tensor3d": ([(6, 8, 10)], {}),
    "tensor3d_merged": ([(4, 4, 16)], dict(merge_dims=True, max_precond_dim=16)),
    "vector_adam": ([(32,)], {}),
    "one_sided_above_max_dim": ([(12, 40)], dict(max_precond_dim=32)),
    "all_dims_above_max_dim": ([(12, 20)], dict(max_precond_dim=8)),
    "normalize_grads": ([(24, 24)], dict(normalize_grads=True)),
    "no_bias_correction": ([(24, 24)], dict(correct_bias=False)),
    "shampoo_beta_and_no_decay": ([(20, 20)], dict(shampoo_beta=0.9, weight_decay=0.0)),
    # several same-shape blocks share one bucket; mixed shapes and a scalar alongside
    "mixed_buckets": ([(16, 16), (16, 16), (16, 16), (8, 6, 3, 3), (32,), (16,), ()], {}),
}


def _run(cls, shapes, kwargs, dtype, skip_schedule=None):
    problem = RegressionProblem(shapes, dtype=dtype)
    return train(
        problem, lambda ps: cls(ps, lr=1e-2, **kwargs), STEPS, skip_schedule=skip_schedule
    ), problem


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_trajectory_matches_reference(name):
    shapes, kwargs = CASES[name]
    fast, problem = _run(SOAP, shapes, kwargs, torch.float32)
    slow, _ = _run(ReferenceSOAP, shapes, kwargs, torch.float32)
    # the run must have moved the parameters for the comparison to mean anything
    assert relative_difference(fast, problem.make_params()) > 0.05
    assert relative_difference(fast, slow) < FP32_TOL


@pytest.mark.parametrize("name", ["matrix", "conv4d_channels_last_merged", "mixed_buckets"])
def test_fp64_trajectory_matches_reference(name):
    shapes, kwargs = CASES[name]
    fast, _ = _run(SOAP, shapes, kwargs, torch.float64)
    slow, _ = _run(ReferenceSOAP, shapes, kwargs, torch.float64)
    assert relative_difference(fast, slow) < FP64_TOL


def test_params_without_grad_on_some_steps():
    """Blocks of one bucket that miss gradients on some steps fall out of step with the rest:
    they are updated as a subset of the bucket and keep their own step counts."""
    shapes = [(16, 16), (16, 16), (16, 16), (32,)]

    def schedule(step):
        return {1} if step % 3 == 0 else ({2, 3} if step % 5 == 0 else set())

    fast, _ = _run(SOAP, shapes, {}, torch.float64, schedule)
    slow, _ = _run(ReferenceSOAP, shapes, {}, torch.float64, schedule)
    assert relative_difference(fast, slow) < FP64_TOL


def test_param_groups_with_different_hyperparameters():
    shapes = [(16, 16), (16, 16), (24, 24), (32,), (8, 6, 3, 3)]
    problem = RegressionProblem(shapes, dtype=torch.float64)

    def groups(ps):
        return [
            dict(params=ps[:2], lr=2e-2, betas=(0.9, 0.99), precondition_frequency=4),
            dict(params=ps[2:4], weight_decay=0.1, shampoo_beta=0.8, eps=1e-6),
            dict(params=ps[4:], normalize_grads=True, correct_bias=False),
        ]

    fast = train(problem, lambda ps: SOAP(groups(ps), lr=1e-2), STEPS)
    slow = train(problem, lambda ps: ReferenceSOAP(groups(ps), lr=1e-2), STEPS)
    assert relative_difference(fast, slow) < FP64_TOL
