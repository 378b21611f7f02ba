"""launch/deepspeed/train.py under the three launchers a DeepSpeed user has, 2 ranks each.

The script trains the demo GPT on the bundled corpus from a JSON config with ``"type": "SOAP"``
and writes one report per rank; every rank must report the same parameters (each block
stepped once, by its owner, and sent back), the strategy the stage calls for, and a loss that
went down.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from distsoap.testing.local_ranks import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "deepspeed" / "train.py"
BIN = Path(sys.executable).parent
ARGS = ["--steps", "12", "--layers", "1", "--d-model", "32", "--context", "32"]
ARGS += ["--corpus-bytes", "200000"]


def _command(launcher: str, config: Path, entry: str, reports: Path) -> list[str]:
    script = [str(SCRIPT), "--deepspeed_config", str(config), "--entry", entry, *ARGS]
    script += ["--report-dir", str(reports)]
    port = str(free_port())
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, *script]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, *script]
    mpirun = BIN / "mpirun" if (BIN / "mpirun").exists() else shutil.which("mpirun")
    if mpirun is None:
        pytest.fail("mpirun not found: install the dev extra (mpi4py, openmpi)")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []  # containers run as root
    return [str(mpirun), "-np", "2", "--oversubscribe", *root, sys.executable, *script]


@pytest.mark.parametrize(
    "launcher,stage,entry",
    [("deepspeed", 2, "plain"), ("torchrun", 3, "wrapper"), ("mpirun", 1, "plain")],
)
def test_launcher_trains_two_ranks(launcher, stage, entry, tmp_path):
    config = ROOT / "launch" / "deepspeed" / f"zero{stage}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        _command(launcher, config, entry, tmp_path / "reports"),
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = sorted((tmp_path / "reports").glob("rank*.json"))
    results = sorted((json.loads(p.read_text()) for p in reports), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 for r in results)
    assert all(r["strategy"] == f"deepspeed_zero{stage}" for r in results)
    assert results[0]["checksum"] == results[1]["checksum"]
    assert results[0]["last_loss"] < results[0]["first_loss"]
