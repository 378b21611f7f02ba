"""Cases that trained silently wrong: every rank must raise the same error instead (gloo, CPU).

- Rank 1 lists same-shape parameters in another order (param groups built from a set): the
  start-up fingerprint sees only shapes. Caught on the first step by comparing every rank's
  copy of every parameter (ddp, zero2, HSDP replicas), at construction from the names (names
  given to SOAP, or FSDP1's model).
- strategy="ddp" on a model not wrapped in DDP after DCP's all-zero-gradient initialising step.
- A parameter made trainable after SOAP was built (never updated by the placing strategies).
"""

import pytest

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.replica_scenarios import (
    misordered,
    misordered_fsdp,
    unfrozen_after_construction,
    unwrapped_ddp_after_dcp_init,
)


def _same_everywhere(messages: list[str]) -> str:
    assert all(m == messages[0] for m in messages), messages
    return messages[0]


@pytest.mark.parametrize("dcp_init_first", [False, True], ids=["plain", "after_dcp_init"])
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_parameters_in_another_order_raise_the_same_error_everywhere(strategy, dcp_init_first):
    message = _same_everywhere(run_ranks(misordered, 2, strategy, dcp_init_first, timeout=120))
    assert message.startswith("ValueError: parameter param_groups[0]['params'][0]"), message
    assert "different orders" in message
    # zero2 sends gradients during backward: caught before the first one leaves
    assert message.endswith("[gradient bytes sent by distsoap in training: 0]"), message


def test_ddp_strategy_unwrapped_after_dcp_init_step_raises_on_the_first_real_step():
    message = _same_everywhere(run_ranks(unwrapped_ddp_after_dcp_init, 2, timeout=120))
    assert message.startswith("RuntimeError: gradients differ across ranks"), message


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp2"])
def test_parameter_unfrozen_after_construction_raises_everywhere(strategy):
    messages = run_ranks(unfrozen_after_construction, 2, strategy, timeout=120)
    message = _same_everywhere(messages)
    frozen = 7 if strategy == "fsdp2" else 8  # the frozen parameter's place in group 0
    assert message.startswith(f"ValueError: parameter param_groups[0]['params'][{frozen}]")
    assert "became trainable" in message


@pytest.mark.parametrize(
    "variant, world, expected",
    [
        ("fsdp2_named", 2, "the parameter names (param_names) differ"),
        # no names given: FSDP2's sharded modules name the parameters, at construction
        ("fsdp2", 2, "the parameter names (param_names) differ"),
        ("hsdp", 4, "the parameter names (param_names) differ"),
        ("fsdp1", 2, "the ranks list the parameters in different orders"),
        # HSDP replicas are compared by value at the first step
        ("hsdp_unseeded", 4, "holds different values on different ranks"),
    ],
)
def test_sharded_parameters_in_another_order_raise_everywhere(variant, world, expected):
    message = _same_everywhere(run_ranks(misordered_fsdp, world, variant, timeout=180))
    assert message.startswith("ValueError:") and expected in message, message
