"""Count the tensor operations a piece of code dispatches (the kernel launches of a GPU run)."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched inside the context, views aside (they launch nothing).

    It sits below Python, so it sees each tensor operation of the code under it; a per-parameter
    loop of tensor operations shows up as a count that grows with the number of parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def count_ops(run: Callable[[], object]) -> int:
    """Non-view aten ops dispatched by ``run()``."""
    with CountOps() as counter:
        run()
    return counter.count
