"""The main job's command line: bad arguments fail once, fast and plainly, before any rank starts.

``scripts/demo.sh`` checks its arguments in one process before torchrun starts the ranks, so a
typo gives one argparse message (not one per rank inside torchrun's ChildFailedError
traceback), and ``--help`` prints once.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distsoap.demo.__main__ import parse_args

ROOT = Path(__file__).resolve().parents[2]


def _demo_sh(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, DISTSOAP_NPROC="2"),
        cwd=ROOT,
    )
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def warm():
    """The first call may install the demo extra: keep it out of the timings."""
    _demo_sh("--help")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "foo"], "argument --strategy: invalid choice: 'foo'"),
        (["--lr", "-1"], "unrecognized arguments: --lr -1"),
        (["--soap-lr", "-1"], "argument --soap-lr: must be a finite number > 0, got '-1'"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_arguments_fail_once_before_any_rank_starts(args, message, warm):
    proc, seconds = _demo_sh(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count(message) == 1, proc.stderr[-2000:]  # once, not once per rank
    assert proc.stderr.count("error:") == 1
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert seconds < 60  # an interpreter start and an import of torch, no training, no torchrun


def test_help_prints_once_with_defaults_and_the_process_count_variable(warm):
    proc, _ = _demo_sh("--steps", "5", "--help")
    assert proc.returncode == 0
    assert proc.stdout.count("usage: python -m distsoap.demo") == 1
    assert "(default: 400)" in proc.stdout  # --steps
    assert "DISTSOAP_NPROC" in proc.stdout


@pytest.mark.parametrize(
    "module, args, extra",
    [("matplotlib", [], "demo"), ("deepspeed", ["--strategy", "deepspeed"], "deepspeed")],
)
def test_a_missing_package_is_named_with_its_extra_before_training(
    module, args, extra, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(SystemExit) as exited:
        parse_args(["--steps", "5", *args])
    assert exited.value.code == 2
    assert f"not installed: {module} (pip install -e '.[{extra}]'" in capsys.readouterr().err
