"""The start-up check that every rank built the same optimizer, with a tensor lr."""

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.tensor_lr_scenarios import build_and_step


def test_equal_tensor_lrs_pass_the_check():
    assert run_ranks(build_and_step, 2, lr_on_rank_1=1e-2, timeout=120) == ["stepped", "stepped"]


def test_tensor_lrs_that_print_alike_but_differ_are_caught():
    # repr() shows both as tensor(0.0100): the check must compare values, not their printout
    results = run_ranks(build_and_step, 2, lr_on_rank_1=1.00001e-2, timeout=120)
    assert all("built differently on different ranks" in r for r in results)
