"""Strategies depend on the block engine's narrow interface, not on the optimizer.

A fake engine (param groups, ``compute_updates``, ``finish_refreshes``, ``faults``) is enough
to run a strategy, and the shared receive path of the placing strategies is checked on its own.
"""

import pytest
import torch

from distsoap.comm import update_flag
from distsoap.faults import FaultPolicy, NumericalFaultError
from distsoap.strategies.base import Strategy, groups_by_param
from distsoap.strategies.single import SingleProcess


class FakeEngine:
    """Deltas of ``-grad`` for whatever it is given; records what it was asked."""

    def __init__(self, groups: list[dict]):
        self.param_groups = groups
        self.faults = FaultPolicy("skip", 3)
        self.asked: list[set[int]] = []

    def compute_updates(self, grads, defer_refresh=False):
        self.asked.append(set(grads))
        owner = groups_by_param(self.param_groups)
        return {key: (owner[key], -grad) for key, grad in grads.items()}

    def finish_refreshes(self):
        pass


def _group(params, lr=1.0, weight_decay=0.0):
    return dict(params=params, lr=lr, weight_decay=weight_decay)


def test_single_process_runs_on_a_fake_engine():
    with_grad, without = torch.zeros(3), torch.ones(2)
    decayed = torch.full((2,), 2.0)
    engine = FakeEngine([_group([with_grad, without]), _group([decayed], 0.5, 0.1)])
    with_grad.grad, decayed.grad = torch.tensor([1.0, 2.0, 3.0]), torch.ones(2)
    strategy = SingleProcess(engine)
    strategy.step()
    assert engine.asked == [{id(with_grad), id(decayed)}]  # only parameters with gradients
    torch.testing.assert_close(with_grad, torch.tensor([-1.0, -2.0, -3.0]), rtol=0, atol=0)
    torch.testing.assert_close(without, torch.ones(2), rtol=0, atol=0)  # untouched
    # W + delta, then decoupled decay on the new W: (2 - 1) * (1 - 0.5 * 0.1)
    torch.testing.assert_close(decayed, torch.full((2,), 0.95), rtol=1e-7, atol=0)
    assert strategy.stats.steps == 1


def test_single_process_raises_the_fault_the_engine_collected():
    param = torch.zeros(2)
    engine = FakeEngine([_group([param])])
    engine.faults.pending = "parameter p: gradient is not finite"
    param.grad = torch.ones(2)
    with pytest.raises(NumericalFaultError, match="not finite"):
        SingleProcess(engine).step()


def test_apply_flagged_applies_flagged_updates_by_group_and_reports_stopping_owners():
    a, b, c = torch.zeros(2, 2), torch.zeros(3), torch.zeros(2)
    engine = FakeEngine([_group([a, b]), _group([c], lr=1.0, weight_decay=0.5)])
    strategy = Strategy(engine)
    received = [
        (0, 1, update_flag(True, False), torch.ones(4)),  # a: update from owner 1
        (1, 0, update_flag(False, False), torch.full((3,), 9.0)),  # b: no update (a first call)
        (2, 3, update_flag(True, True), torch.ones(2)),  # c: update, and owner 3 must stop
        (1, 2, update_flag(False, True), torch.zeros(0)),  # owner 2 stops, sends nothing
    ]
    params = [a, b, c]
    stopping = strategy.apply_flagged(
        received, params, params.__getitem__, groups_by_param(engine.param_groups)
    )
    assert stopping == {2, 3}
    torch.testing.assert_close(a, torch.ones(2, 2), rtol=0, atol=0)  # reshaped to the target
    torch.testing.assert_close(b, torch.zeros(3), rtol=0, atol=0)
    torch.testing.assert_close(c, torch.full((2,), 0.5), rtol=0, atol=0)  # c's group decays


def test_defaults_place_nothing():
    param = torch.zeros(4, 3)
    strategy = Strategy(FakeEngine([_group([param])]))
    assert strategy.owns(param) and strategy.state_shape(param) == (4, 3)
    assert strategy.state_key_suffix() == "" and not strategy.views_model
    with strategy.no_sync(), strategy.model_view():
        pass
    strategy.close()
    with pytest.raises(NotImplementedError):
        strategy.step()
