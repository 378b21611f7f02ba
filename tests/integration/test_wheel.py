"""The built wheel in a fresh virtual environment, used from a folder outside the checkout.

The wheel is built from a copy of the source tree (no stale ``build/`` folder can leak into it)
and installed with its ``triton`` and ``demo`` extras into a new venv. Torch is already
installed there, as on a cluster image: where the base interpreter (``sys.base_prefix``) has
torch, the venv is made with ``--system-site-packages`` and keeps it, as
``scripts/setup_env.sh`` does; otherwise (this machine's base has none) the torch running the
tests and the packages it requires are linked into a folder the venv reads through a path file
(installing the 800 MB wheel again took 45 s of every CI run), so distsoap's own ``torch>=``
requirement is met and nothing else of the test environment is visible. Every command then runs
from
``tmp_path`` with ``PYTHONPATH`` unset and user site-packages off: nothing of the checkout can
shadow the installed package, and each imported module's ``__file__`` must lie in the venv.
"""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.integration.demo_args import tiny_demo_args

ROOT = Path(__file__).resolve().parents[2]
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "runs", "__pycache__", "*.egg-info", ".*_cache", ".cache"
)
SHADOWING_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")


def expected_modules() -> list[str]:
    """Every module of the source tree, by the name it has once installed.

    Walked from the files, not from setup.py, so a new module or subpackage is covered (and a
    folder without ``__init__.py``, which a wheel would leave out, is caught).
    """
    names = []
    for folder, prefix in ((ROOT / "distsoap", "distsoap"), (ROOT / "kernels", "distsoap.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = [prefix, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


def _run(command: list, env: dict, cwd: Path, timeout: int = 300) -> str:
    proc = subprocess.run(
        [str(c) for c in command], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"{command}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def _link_torch(folder: Path) -> Path:
    """``folder`` holding links to this torch and what it requires (their files and metadata)."""
    folder.mkdir()
    seen: set[str] = set()
    pending = ["torch"]
    while pending:
        try:
            dist = importlib.metadata.distribution(pending.pop())
        except importlib.metadata.PackageNotFoundError:  # a requirement for another platform
            continue
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in seen or name in ("setuptools", "pip"):  # the venv has its own
            continue
        seen.add(name)
        site = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (folder / top).exists() and (site / top).exists():
                (folder / top).symlink_to(site / top)
        requirements = [r for r in dist.requires or [] if "extra ==" not in r]
        pending += [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requirements]
    return folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build the wheel, install it into a fresh venv; the venv's python and a clean env."""
    tmp = tmp_path_factory.mktemp("wheel")
    source, wheels, venv, outside = tmp / "src", tmp / "wheels", tmp / "venv", tmp / "outside"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in SHADOWING_VARIABLES}
    env.update(PYTHONNOUSERSITE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    _run([*build, "-w", wheels, source], env, outside)
    (wheel,) = wheels.glob("distsoap-*.whl")

    base_python = getattr(sys, "_base_executable", sys.executable)
    probe = subprocess.run([base_python, "-c", "import torch"], env=env, capture_output=True)
    base_has_torch = probe.returncode == 0
    make_venv = [base_python, "-m", "venv", *(["--system-site-packages"] * base_has_torch)]
    _run([*make_venv, venv], env, outside)
    python = venv / "bin" / "python"
    if not base_has_torch:
        purelib = _run([python, "-c", PURELIB], env, outside).strip()
        Path(purelib, "torch_already_installed.pth").write_text(f"{_link_torch(tmp / 'torch')}\n")
    _run([python, "-m", "pip", "install", "-q", f"{wheel}[triton,demo]"], env, outside)
    yield dict(wheel=wheel, venv=venv, python=python, env=env, outside=outside)
    shutil.rmtree(tmp, ignore_errors=True)  # ~2 GB of venv; pytest keeps its last 3 tmp dirs


def test_wheel_holds_distsoap_and_no_top_level_kernels(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert {n.split("/")[0] for n in names} == {"distsoap", "distsoap-0.1.0.dist-info"}
    for module in expected_modules():
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, module


IMPORT_EVERY_MODULE = """
import importlib, importlib.util, json, sys

result = {"top_level_kernels": importlib.util.find_spec("kernels") is not None}
for name in json.loads(sys.argv[1]):
    try:
        if name.endswith(".__main__"):  # runs main() only as a script: located, not imported
            result[name] = {"file": importlib.util.find_spec(name).origin}
        else:
            result[name] = {"file": importlib.import_module(name).__file__}
    except ModuleNotFoundError as error:
        try:  # the module is installed and only a dependency of it is not?
            origin = importlib.util.find_spec(name).origin
        except (ModuleNotFoundError, AttributeError):
            origin = None
        result[name] = {"missing": error.name, "file": origin}
print(json.dumps(result))
"""


def _optional_requirements(wheel: Path) -> set[str]:
    """Import-style names of the requirements that only an extra brings."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("distsoap-0.1.0.dist-info/METADATA").decode()
    lines = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+).*extra ==", metadata, re.M)
    return {name.lower().replace("-", "_") for name in lines}


def test_every_module_imports_from_the_installed_package(installed):
    modules = expected_modules()
    assert "distsoap.strategies" in modules and "distsoap.kernels" in modules
    script = installed["outside"] / "import_every_module.py"
    script.write_text(IMPORT_EVERY_MODULE)
    out = _run([installed["python"], script, json.dumps(modules)], installed["env"], script.parent)
    result = json.loads(out)
    assert not result.pop("top_level_kernels")  # installed as distsoap.kernels only
    optional = _optional_requirements(installed["wheel"])
    assert {"triton", "deepspeed", "mpi4py"} <= optional
    venv = installed["venv"].resolve()
    for name in modules:
        found = result[name]
        assert found["file"] and Path(found["file"]).resolve().is_relative_to(venv), (name, found)
        if "missing" in found:  # a framework integration whose extra is not installed here
            assert found["missing"].split(".")[0] in optional, (name, found)
    imported = [name for name in modules if "missing" not in result[name]]
    assert "distsoap.kernels.symmetric_factor_triton" in imported  # the triton extra works


ZERO2_STEPS = """
import json, sys
import torch
import torch.distributed as dist
import distsoap
from distsoap import SOAP
from distsoap.cluster.process_group import release_process_groups

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same initial model on every rank
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
initial = [p.detach().clone() for p in model.parameters()]
opt = SOAP(model.parameters(), lr=1e-2, strategy="zero2", precondition_frequency=2)
data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
for _ in range(3):
    opt.zero_grad(set_to_none=True)
    model(torch.randn(16, 8, generator=data)).square().mean().backward()
    opt.step()
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if rank == 0:
    result = {
        "replicas_equal": all(torch.equal(g, gathered[0]) for g in gathered),
        "moved": not torch.equal(flat, torch.cat([p.reshape(-1) for p in initial])),
        "world": dist.get_world_size(),
        "file": distsoap.__file__,
    }
    open(sys.argv[1], "w").write(json.dumps(result))
# not a bare destroy_process_group(): one rank tearing gloo down while the optimizer's cycle still
# holds gloo objects sometimes aborted the process ("terminate called without an active exception")
release_process_groups()
"""


def test_torchrun_two_rank_zero2_steps(installed):
    outside = installed["outside"]
    script, result = outside / "zero2_steps.py", outside / "zero2_result.json"
    script.write_text(ZERO2_STEPS)
    torchrun = [installed["python"], "-m", "torch.distributed.run", "--standalone"]
    _run([*torchrun, "--nproc_per_node=2", script, result], installed["env"], outside)
    got = json.loads(result.read_text())
    assert got["world"] == 2 and got["moved"]
    # zero2: each block's update is computed by its owner and sent to the other rank
    assert got["replicas_equal"]
    assert Path(got["file"]).resolve().is_relative_to(installed["venv"].resolve())


def test_demo_runs_from_the_installed_package(installed):
    outside, env = installed["outside"], installed["env"]
    demo = outside / "demo"
    args = [*tiny_demo_args(steps=2, eval_every=2), "--out", demo]
    _run([installed["python"], "-m", "distsoap.demo", *args], env, outside)
    assert (demo / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((demo / "summary.json").read_text())
    assert len(summary["runs"]["soap"]["train_loss"]) == 2
    # the console script of the wheel's entry points resolves to the same main()
    assert "usage:" in _run([installed["venv"] / "bin" / "distsoap-demo", "--help"], env, outside)
