"""Single process: every block is computed here, nothing is communicated."""

from __future__ import annotations

from distsoap.strategies.base import Strategy, apply_updates


class SingleProcess(Strategy):
    """Step every parameter that has a gradient, on this process."""

    name = "single"

    def step(self) -> None:
        """Compute and apply the update of every parameter with a gradient."""
        groups = self.engine.param_groups
        grads = {id(p): p.grad for group in groups for p in group["params"] if p.grad is not None}
        apply_updates(groups, self.engine.compute_updates(grads))
        self.finish(self.engine.faults.take_pending(), set())
