"""The demo's summary says in one sentence whether SOAP reached AdamW, and the plot shows it."""

import pytest

from distsoap.demo.report import plot_losses, summarize
from distsoap.demo.train import RunResult


def _run(name, val_loss, steps=100):
    return RunResult(
        name=name,
        train_loss=[5.0 - 2.0 * i / steps for i in range(steps)],
        eval_steps=[25, 50, 75, 100],
        val_loss=val_loss,
        wall_seconds=10.0,
        optimizer_seconds=2.0,
    )


def test_verdict_when_soap_reaches_adamw():
    results = [_run("soap", [3.0, 2.4, 2.1, 2.0]), _run("adamw", [3.2, 2.8, 2.5, 2.4])]
    head = summarize(results, {})["headline"]
    assert head["soap_steps_to_adamw_final_val_loss"] == 50
    assert head["verdict"] == (
        "SOAP reached AdamW's final validation loss 2.400 at step 50 of 100 (50% of the steps)."
    )


def test_verdict_when_soap_does_not_reach_adamw_in_a_short_run():
    results = [_run("soap", [3.3, 3.2, 3.1, 3.0]), _run("adamw", [3.2, 3.0, 2.95, 2.9])]
    head = summarize(results, {})["headline"]
    assert head["soap_steps_to_adamw_final_val_loss"] is None
    assert head["verdict"].startswith("SOAP did not reach AdamW's final validation loss (2.900)")
    assert "within 100 steps" in head["verdict"]
    assert "not counted" in head["comm_bytes_per_step_counts"]  # says what the bytes are


@pytest.mark.parametrize("soap_final", [2.0, 3.0], ids=["reached", "not_reached"])
def test_plot_is_written_with_the_target_line(soap_final, tmp_path):
    pytest.importorskip("matplotlib")
    results = [_run("soap", [3.3, 3.1, 2.9, soap_final]), _run("adamw", [3.2, 3.0, 2.9, 2.8])]
    path = tmp_path / "loss.png"
    plot_losses(results, path, "strategy ddp, 2 ranks, cpu")
    assert path.read_bytes().startswith(b"\x89PNG")
