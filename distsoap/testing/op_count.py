"""Count the tensor operations a piece of code dispatches: the kernel launches of a GPU run.

A diagnostic for the hot path: a per-parameter loop of tensor operations shows up as a count
that grows with the number of parameters, on any device, CPU included. Used by the tests that
hold distsoap's step to a fixed number of operations per bucket, and by
``benchmarks/bench_host.py``.

    from distsoap.testing.op_count import count_ops
    print(count_ops(optimizer.step))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched inside the context, views aside (they launch nothing).

    It sits below autograd and Python, so it sees each tensor operation the code runs,
    including those of torch's own optimizers (a ``_foreach`` op counts once).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.scalar_reads = 0
        """Of ``count``, the reads of a tensor's value into Python by ``.item()`` (``.tolist()``
        does not dispatch, so it is not seen): a device sync for a GPU tensor, no kernel for a
        CPU one (torch's AdamW reads its CPU step counters this way, two per parameter)."""
        self.host_tensors = 0
        """Of ``count``, the tensors built from Python data (``torch.tensor(list)``, indexing
        with a list). For a GPU tensor each is a host-to-device copy from pageable memory,
        which torch makes synchronous: the host waits for the device's queued work."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        self.scalar_reads += func is torch.ops.aten._local_scalar_dense.default
        self.host_tensors += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


def count_ops(run: Callable[[], object]) -> int:
    """Non-view aten ops dispatched by ``run()``."""
    with CountOps() as counter:
        run()
    return counter.count
