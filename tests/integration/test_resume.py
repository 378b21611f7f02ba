"""Checkpoint directories: a save killed half-way never passes for a checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distsoap.checkpointing import resume
from tests.integration.demo_args import tiny_demo_args

SAVER = """
import sys, torch
from distsoap.checkpointing import resume
root = sys.argv[1]
resume.save(root, 1, {"w": torch.ones(10)})                        # a small, complete one
print("big save starting", flush=True)
resume.save(root, 2, {f"w{i}": torch.randn(4_000_000) for i in range(40)})   # 640 MB
print("big save finished", flush=True)
"""


def test_killed_save_leaves_no_valid_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "big save starting"
    deadline = time.monotonic() + 60
    partial = root / "step_00000002.partial"
    while not any(partial.glob("*.distcp")) and time.monotonic() < deadline:
        time.sleep(0.01)  # wait until the saver is writing data files
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (root / "step_00000002").exists():
        pytest.fail("the saver finished before it could be killed; make the state bigger")
    assert partial.exists()  # it was killed half-way through writing
    found = resume.latest(root)
    assert found == root / "step_00000001"
    state = {"w": torch.zeros(10)}
    resume.load(found, state)
    assert torch.equal(state["w"], torch.ones(10))
    # the next save of step 2 replaces the leftover
    resume.save(root, 2, {"w": torch.full((10,), 2.0)})
    assert resume.latest(root) == root / "step_00000002"
    assert not partial.exists()


def test_step_of_and_empty_root(tmp_path):
    assert resume.latest(tmp_path / "none") is None
    assert resume.step_of(Path("x/step_00000042")) == 42
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        resume.step_of("x/latest")
    os.makedirs(tmp_path / "step_00000007")  # no .metadata: not a checkpoint
    assert resume.latest(tmp_path) is None


TINY = tiny_demo_args(steps=8, eval_every=4)


@pytest.mark.parametrize("strategy", ["zero2", "fsdp2"])
def test_torchrun_restart_after_sigkill_resumes_to_the_same_result(tmp_path, strategy):
    """torchrun --max-restarts=1; rank 1 SIGKILLs itself after step 5 of the SOAP run; the
    restarted job resumes from the step-4 checkpoint and ends where an unbroken job ends."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    common = [*TINY, "--strategy", strategy]
    broken = subprocess.run(
        [
            *torchrun,
            "--max-restarts=1",
            "-m",
            "distsoap.demo",
            *common,
            "--out",
            str(tmp_path / "broken"),
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--checkpoint-every",
            "2",
            "--simulate-failure-at-step",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert broken.returncode == 0, broken.stderr[-3000:]
    assert "exitcode: -9" in broken.stderr  # a worker really died of SIGKILL, and was restarted
    unbroken = subprocess.run(
        [*torchrun, "-m", "distsoap.demo", *common, "--out", str(tmp_path / "unbroken")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    import json

    got = json.loads((tmp_path / "broken" / "summary.json").read_text())["runs"]
    want = json.loads((tmp_path / "unbroken" / "summary.json").read_text())["runs"]
    for name in ("soap", "adamw"):  # same world size: bit-identical continuation
        assert got[name]["train_loss"] == want[name]["train_loss"]
        assert got[name]["val_loss"] == want[name]["val_loss"]
    assert resume.step_of(resume.latest(tmp_path / "ckpt" / "soap")) == 8
