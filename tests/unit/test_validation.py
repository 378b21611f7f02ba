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
        (dict(lr=float("inf")), r"lr must be a real number >= 0 and finite"),
        (dict(eps=float("inf")), r"eps must be a real number >= 0 and finite"),
        (dict(weight_decay=float("inf")), r"weight_decay must be a real number >= 0 and finite"),
        (dict(lr=torch.tensor(float("inf"))), r"lr must be a real number >= 0 and finite"),
        (dict(lr=torch.tensor(-1e-3)), r"lr must be a real number >= 0 and finite"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), r"or a 1-element floating-point tensor"),
        (dict(lr=torch.tensor(1)), r"or a 1-element floating-point tensor"),
        (dict(maximize=1), r"maximize must be True or False"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SOAP(_params(), **kwargs)


def test_bad_group_hyperparameter_raises():
    with pytest.raises(ValueError, match="beta1"):
        SOAP([{"params": _params(), "betas": (1.5, 0.9)}])
    with pytest.raises(ValueError, match="maximize must be True or False"):
        SOAP(_params()).add_param_group({"params": _params(), "maximize": "yes"})


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


@pytest.mark.parametrize(
    "shape, change",
    [
        ((4, 4, 4), {"merge_dims": True}),  # the block's shape changes
        ((16, 40), {"max_precond_dim": 8}),  # same shape, one factor fewer
        ((4, 40), {"max_precond_dim": 64}),  # same shape, one factor more
        ((6,), {"precondition_1d": True}),  # a 1-D block gains its factor
    ],
)
def test_layout_options_cannot_change_mid_training(shape, change):
    p = torch.nn.Parameter(torch.randn(shape))
    opt = SOAP([p], max_precond_dim=32)
    for _ in range(2):
        p.grad = torch.randn(shape)
        opt.step()
    opt.param_groups[0].update(change)
    p.grad = torch.randn(shape)
    with pytest.raises(ValueError, match="cannot change during training"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strategy="fsdp9"), r"strategy must be one of"),
        (dict(strategy="ddp"), r"needs torch.distributed initialised"),
        (dict(strategy="zero2"), r"needs torch.distributed initialised"),
        (dict(comm_dtype=torch.int32), r"comm_dtype must be one of"),
        (dict(bucket_cap_mb=0), r"bucket_cap_mb must be > 0"),
        (dict(split_blocks="always"), r"split_blocks must be one of \('auto', 'never'\)"),
    ],
)
def test_bad_distributed_options_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SOAP(_params(), **kwargs)


def test_parameter_changing_shape_raises():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([p])
    p.grad = torch.randn(4, 4)
    opt.step()
    p.data = torch.randn(4, 5)
    p.grad = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"changed from shape \(4, 4\) on cpu to \(4, 5\)"):
        opt.step()


def test_replaced_parameters_raise_pointing_at_the_integration():
    """A framework that swaps param_groups' tensors behind SOAP's back gets a clear error."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([p])
    flat = torch.zeros(16, requires_grad=True)  # what DeepSpeed ZeRO puts in a group
    flat.grad = torch.ones(16)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="import distsoap.integrations.deepspeed"):
        opt.step()


def test_parameter_changing_device_raises():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = SOAP([p])
    # what Module.to(device) does under torch.__future__'s swap-on-conversion
    torch.utils.swap_tensors(p, torch.nn.Parameter(torch.empty(4, 4, device="meta")))
    with pytest.raises(ValueError, match="on meta"):
        opt.step()


def test_clip_grad_norm_needs_a_positive_bound():
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        SOAP(_params()).clip_grad_norm_(0.0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_and_bool_parameters_are_refused_at_construction(dtype):
    params = _params() + [torch.zeros(3, 2, dtype=dtype)]
    message = rf"param_groups\[0\]\['params'\]\[1\] of shape \(3, 2\) has dtype {dtype}"
    with pytest.raises(ValueError, match=message):
        SOAP(params)


def test_refused_parameter_is_named_and_its_group_not_kept():
    opt = SOAP([("weight", torch.nn.Parameter(torch.randn(4, 4)))])
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] \('steps'\) of shape \(\) has dtype"):
        opt.add_param_group({"params": [("steps", torch.tensor(3))]})
    assert len(opt.param_groups) == 1


def test_meta_parameters_are_refused_at_construction():
    meta = torch.nn.Parameter(torch.empty(4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"of shape \(4, 4\) is on the meta device"):
        SOAP([meta])


def test_elementwise_names_the_valid_choices():
    with pytest.raises(ValueError, match=r"elementwise must be one of \('auto', 'torch'"):
        SOAP([torch.nn.Parameter(torch.randn(3, 3))], elementwise="fused")


def test_forced_triton_without_triton_installed_is_a_value_error(monkeypatch):
    from distsoap.engine import elementwise

    monkeypatch.setattr(elementwise, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs Triton installed"):
        SOAP([torch.nn.Parameter(torch.randn(3, 3))], elementwise="triton")


def test_compile_elementwise_is_a_deprecated_spelling_of_compile():
    from distsoap.kernels import compiled_rotated_adam_direction

    param = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.warns(DeprecationWarning, match="elementwise='compile'"):
        opt = SOAP([param], compile_elementwise=True)
    assert opt.elementwise == "compile"
    assert opt.engine.elementwise is compiled_rotated_adam_direction
    with pytest.raises(ValueError, match="not both"):
        SOAP([param], compile_elementwise=True, elementwise="torch")
    with pytest.raises(ValueError, match="compile_elementwise must be True or False"):
        SOAP([param], compile_elementwise="yes")
