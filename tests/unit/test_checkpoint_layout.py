"""Loading state laid out for other shapes or layout settings is a clear error."""

import pytest
import torch

from distsoap import SOAP


def _trained_state(shape=(8, 6, 3, 3), **kwargs):
    p = torch.nn.Parameter(torch.randn(shape))
    opt = SOAP(list(zip(["conv.weight"], [p])), **kwargs)
    for _ in range(3):
        p.grad = torch.randn(shape)
        opt.step()
    return opt.state_dict()


@pytest.mark.parametrize(
    "saved, loaded, shape",
    [
        (dict(), dict(max_precond_dim=5), (8, 6, 3, 3)),
        (dict(), dict(merge_dims=True), (8, 6, 3, 3)),
        (dict(precondition_1d=True), dict(), (7,)),
        (dict(), dict(), "other"),
    ],
    ids=["max_precond_dim", "merge_dims", "precondition_1d", "parameter_shape"],
)
def test_mismatched_layout_raises_naming_the_difference(saved, loaded, shape):
    state = _trained_state(shape if shape != "other" else (8, 6, 3, 3), **saved)
    new_shape = (8, 6, 9) if shape == "other" else shape
    p = torch.nn.Parameter(torch.randn(new_shape))
    opt = SOAP(list(zip(["conv.weight"], [p])), **loaded)
    if shape == "other":
        message = r"'conv.weight' has block_shape=\(8, 6, 3, 3\).* lays it out as"
    else:
        key = next(iter(saved or loaded))
        message = rf"param group 0: the checkpoint was saved with {key}="
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)


def test_matching_layout_loads():
    state = _trained_state(merge_dims=True)
    p = torch.nn.Parameter(torch.randn(8, 6, 3, 3))
    opt = SOAP(list(zip(["conv.weight"], [p])), merge_dims=True)
    opt.load_state_dict(state)
    assert opt.state[p]["step"] == 2
