"""The repository stands on its own: no file points at a path outside it, no link is dead.

Scans every tracked text file: markdown links (``[text](target)``) must name a file or folder
inside the repository that exists (web addresses and in-page anchors aside), and nothing may
refer to the planning notes kept beside the checkout, which users never get.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEXT = (".md", ".py", ".sh", ".toml", ".cfg", ".txt", ".json", ".sbatch", ".yaml", ".yml")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# the planning notes kept beside the checkout, which users never get
OUTSIDE = re.compile(r"\.\./shared\b|shared/(?:SOAP|DESIGN)\.md")


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / f for f in listed if f.endswith(TEXT) or "Dockerfile" in f]


@pytest.fixture(scope="module")
def files():
    found = tracked_text_files()
    assert len(found) > 50  # the scan really read the tree
    return found


def test_no_file_refers_outside_the_repository(files):
    offenders = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_markdown_links_resolve_inside_the_repository(files):
    dead = []
    for path in (f for f in files if f.suffix == ".md"):
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor in the same page
            resolved = (path.parent / target.split("#")[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                dead.append(f"{path.relative_to(ROOT)}: {target}")
    assert not dead, "\n".join(dead)


def test_the_checks_catch_what_they_look_for():
    notes = "shared"  # spelled apart, so this file does not refer to them itself
    assert OUTSIDE.search(f"see ../{notes}/SOAP.md") and OUTSIDE.search(f"({notes}/DESIGN.md)")
    assert not OUTSIDE.search("docs/algorithm.md") and not OUTSIDE.search("../README.md")
    assert LINK.findall("[a](docs/x.md) and [b](https://example.org)") == [
        "docs/x.md",
        "https://example.org",
    ]
