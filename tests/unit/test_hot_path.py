"""The step's tensor work is per bucket of same-shape blocks, never per parameter."""

import itertools

import pytest
import torch

from distsoap import SOAP
from distsoap.testing.op_count import CountOps

OPTIONS = {
    "default": {},
    "staggered": dict(refresh_schedule="staggered"),
    "normalize_grads": dict(normalize_grads=True),
}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_ops_per_step_do_not_grow_with_the_number_of_parameters(dtype, options):
    """The hot path is batched: the aten ops one step dispatches (views aside) are per bucket.

    Counted below Python with a dispatch mode, so every tensor operation of the step is seen;
    on a GPU each is a kernel launch, which is what a per-parameter loop would multiply.
    """

    def ops_in_one_step(copies: int, refresh: bool) -> tuple[int, int]:
        torch.manual_seed(0)
        shapes = [(6, 5), (7,), (3, 4, 2)] * copies
        params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
        opt = SOAP(params, weight_decay=0.1, precondition_frequency=3, **OPTIONS[options])
        # call 0 is the first call; update 6 refreshes (aligned), in the second cycle
        measured = 6 if refresh else 7
        for call in range(measured + 1):
            for p in params:
                p.grad = torch.randn_like(p)
            if call == measured:
                with CountOps() as counter:
                    opt.step()
                return counter.count, counter.host_tensors
            opt.step()
        raise AssertionError("unreachable")

    for refresh in (False, True):
        # at 6 copies and more, a staggered schedule has rows of every bucket due on every step
        # (at 2, some buckets would skip a step's refresh: fewer ops, not a per-block cost)
        few, many = ops_in_one_step(6, refresh), ops_in_one_step(12, refresh)
        assert few == many, (refresh, few, many)
        # no tensor built from host data (step sizes, row indices): on a GPU each would be a
        # copy that waits for the device's queued work
        assert few[1] == 0, (refresh, few)


def test_parameter_names_are_built_once_not_per_block(monkeypatch):
    """Every refreshed block reports to the fault counters by name; the name table is built
    once per param-group layout, so a refresh step is not quadratic in the parameter count."""
    import distsoap.engine.block_engine as engine_module

    calls = []
    real = engine_module.parameter_names

    def counting(groups):
        calls.append(1)
        return real(groups)

    monkeypatch.setattr(engine_module, "parameter_names", counting)
    params = [torch.nn.Parameter(torch.randn(5, 4)) for _ in range(20)]
    opt = SOAP(params, precondition_frequency=2)
    for _ in range(7):  # the first call (20 eighs) and three refresh steps
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(calls) == 1
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    assert opt.param_name(params[0]) == "param_groups[0]['params'][0] of shape (5, 4)"
    assert len(calls) == 2  # a new group layout: built again


def test_step_plans_stay_bounded_when_the_stepped_subset_changes():
    """Each set of parameters with gradients gets its own plan; at most MAX_STEP_PLANS are
    kept, and the results stay those of the per-parameter reference."""
    from distsoap import ReferenceSOAP
    from distsoap.engine.block_engine import MAX_STEP_PLANS

    subsets = list(itertools.combinations(range(6), 2))  # 15 pairs left out, > MAX_STEP_PLANS
    runs = []
    for cls in (SOAP, ReferenceSOAP):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen).double()) for _ in range(6)]
        opt = cls(params, precondition_frequency=3)
        for step in range(2 + 3 * len(subsets)):  # two full steps, then every subset 3 times
            left_out = subsets[step % len(subsets)] if step >= 2 else ()
            for i, p in enumerate(params):
                grad = torch.randn(4, 3, generator=gen).double()
                p.grad = None if i in left_out else grad
            opt.step()
        runs.append(params)
        if cls is SOAP:
            assert len(opt.engine._plans) == MAX_STEP_PLANS
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)  # fp64 rounding only


def _apply_one_by_one(params, deltas, group):
    """The definition of the low-precision update: each parameter widened, updated, rounded."""
    decay = -group["lr"] * group["weight_decay"]
    for p, d in zip(params, deltas):
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        weight = p.to(work).add_(d.to(work))
        if group["weight_decay"] > 0:
            weight.add_(weight, alpha=decay)
        p.copy_(weight)


@pytest.mark.parametrize("chunk", [1 << 25, 40])  # one chunk; many (a chunk per few params)
def test_low_precision_apply_equals_widening_each_parameter(monkeypatch, chunk):
    """bf16 / fp16 parameters are updated in chunks with a fixed kernel count; the result is
    bitwise that of widening, updating and rounding each parameter on its own."""
    import distsoap.engine.update as engine

    monkeypatch.setattr(engine, "APPLY_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (7,), (3, 5), (33, 17), (4, 6, 3, 3), (10003,)]
    dtypes = [torch.bfloat16, torch.float16, torch.bfloat16, torch.float32, torch.float64]
    params, deltas = [], []
    for i, shape in enumerate(shapes * 2):
        params.append(torch.randn(shape, generator=gen).to(dtypes[i % len(dtypes)]))
        delta = torch.randn(shape, generator=gen) * 1e-2
        deltas.append(delta.bfloat16() if i % 3 == 0 else delta)  # some crossed the wire in bf16
    params[3] = params[3].mT.contiguous().mT  # a strided parameter
    for weight_decay in (0.0, 0.3):
        group = dict(lr=0.1, weight_decay=weight_decay)
        want = [p.clone() for p in params]
        _apply_one_by_one(want, deltas, group)
        got = [p.clone() for p in params]
        engine.apply_deltas(got, deltas, group)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)
        assert not torch.equal(got[5], params[5])  # the update did something (10003 elements)
