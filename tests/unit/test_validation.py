import pytest
import torch

from distsoap import SOAP


def _params():
    return [torch.nn.Parameter(torch.randn(4, 4))]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1e-3), r"lr must be a real number >= 0"),
        (dict(eps=-1.0), r"eps must be a real number >= 0"),
        (dict(betas=(1.0, 0.9)), r"beta1 must be in \[0, 1\)"),
        (dict(betas=(0.9, -0.1)), r"beta2 must be in \[0, 1\)"),
        (dict(betas=(0.9,)), r"betas must be a pair"),
        (dict(shampoo_beta=1.0), r"shampoo_beta must be in \[0, 1\)"),
        (dict(weight_decay=-0.1), r"weight_decay must be a real number >= 0"),
        (dict(precondition_frequency=0), r"precondition_frequency must be an integer >= 1"),
        (dict(precondition_frequency=2.5), r"precondition_frequency must be an integer >= 1"),
        (dict(max_precond_dim=0), r"max_precond_dim must be an integer >= 1"),
        (dict(data_format="nhwc"), r"data_format must be one of"),
        (dict(merge_dims="yes"), r"merge_dims must be True or False"),
        (dict(moment_dtype=torch.int8), r"moment_dtype must be one of"),
        (dict(lr=float("nan")), r"lr must be a real number >= 0"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SOAP(_params(), **kwargs)


def test_bad_group_hyperparameter_raises():
    with pytest.raises(ValueError, match="beta1"):
        SOAP([{"params": _params(), "betas": (1.5, 0.9)}])


def test_sparse_gradient_is_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SOAP(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_complex_parameter_is_rejected():
    p = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    opt = SOAP([p])
    p.grad = torch.randn(3, 3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


def test_layout_options_cannot_change_mid_training():
    p = torch.nn.Parameter(torch.randn(4, 4, 4))
    opt = SOAP([p])
    for _ in range(2):
        p.grad = torch.randn(4, 4, 4)
        opt.step()
    opt.param_groups[0]["merge_dims"] = True
    with pytest.raises(ValueError, match="cannot change during training"):
        opt.step()
