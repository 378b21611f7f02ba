"""Unrotated blocks are exactly the Adam recurrence of docs/algorithm.md ("Tolerances").

That recurrence is not torch.optim.AdamW: the first call makes no update, eps is added to the
uncorrected sqrt(V), and decay is applied after the update, to the updated weight.
"""

import pytest
import torch

from distsoap import SOAP

STEPS = 30
TOL = 1e-12  # fp64, same formula in a different operation order


def _gradients(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(STEPS)]


def _soap_run(shape, grads, **kwargs):
    p = torch.nn.Parameter(
        torch.linspace(-1, 1, int(torch.tensor(shape).prod())).reshape(shape).double()
    )
    opt = SOAP([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def _recurrence(w, grads, lr, betas, eps, weight_decay):
    """docs/algorithm.md steps 3-9 with every Q = identity, first call skipped."""
    beta1, beta2 = betas
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads[1:], start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        size = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
        w = w - size * m / (v.sqrt() + eps)
        w = w - lr * weight_decay * w
    return w


@pytest.mark.parametrize("shape, extra", [((17,), {}), ((6, 9), dict(max_precond_dim=5))])
def test_unrotated_block_follows_adam_recurrence(shape, extra):
    grads = _gradients(shape)
    kwargs = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1)
    got = _soap_run(shape, grads, **kwargs, **extra)
    w0 = torch.linspace(-1, 1, got.numel()).reshape(shape).double()
    want = _recurrence(w0, grads, **kwargs)
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_matches_torch_adam_fed_from_second_call():
    """With no decay and an eps far below |g|, torch's Adam given the gradients from the second
    call on takes the same steps (torch's eps placement differs by a factor sqrt(1 - beta2^t))."""
    shape = (23,)
    grads = _gradients(shape, seed=3)
    got = _soap_run(shape, grads, lr=0.01, betas=(0.9, 0.999), eps=1e-14, weight_decay=0.0)
    p = torch.nn.Parameter(torch.linspace(-1, 1, 23).double())
    adam = torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.999), eps=1e-14)
    for g in grads[1:]:
        p.grad = g.clone()
        adam.step()
    torch.testing.assert_close(got, p.detach(), rtol=TOL, atol=TOL)
