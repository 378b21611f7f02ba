"""Every strategy communicates over the group it was given, never the whole world.

Two gloo ranks, each training its own FSDP2 model over a one-rank sub-group: what happens on
one rank's group must not reach the other. ``fsdp2_local`` once all-reduced its stop flag over
the world, so a fault on rank 0 stopped rank 1 as well.
"""

import torch
import torch.distributed as dist

from distsoap.testing.local_ranks import run_ranks


def own_group_fault(rank: int, world: int, strategy: str) -> dict:
    """Each rank alone in its group; rank 0's second step has a NaN gradient (raise policy)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from distsoap import SOAP
    from distsoap.faults import NumericalFaultError
    from distsoap.strategies.sharded import local_grad

    groups = [dist.new_group([r]) for r in range(world)]  # collective: every rank makes each
    mine = groups[rank]
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    fully_shard(model, mesh=DeviceMesh.from_group(mine, "cpu"))
    opt = SOAP(model.parameters(), strategy=strategy, process_group=mine, nonfinite_grads="raise")
    raised = []
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        if rank == 0 and step == 1:
            local_grad(next(iter(model.parameters()))).fill_(float("nan"))
        try:
            opt.step()
        except NumericalFaultError:
            raised.append(step)
    dist.barrier()  # both ranks finish their steps before either leaves
    return dict(raised=raised, fault_check=opt.comm_stats["total_bytes"].get("fault_check", 0))


def test_fsdp2_local_stop_flag_stays_in_its_group():
    by_rank = run_ranks(own_group_fault, 2, strategy="fsdp2_local")
    assert by_rank[0]["raised"] == [1]  # the rank with the NaN stops at that step
    assert by_rank[1]["raised"] == []  # its group holds only itself: nothing reaches it
    assert [r["fault_check"] for r in by_rank] == [0, 0]  # a one-rank group sends no bytes


def test_fsdp2_lossless_exchanges_stay_in_their_group():
    by_rank = run_ranks(own_group_fault, 2, strategy="fsdp2")
    assert by_rank[0]["raised"] == [1]
    assert by_rank[1]["raised"] == []
