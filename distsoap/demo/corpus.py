"""The demo corpus: the running interpreter's own standard library sources, as bytes.

Needs no download: every Python installation carries it. Files are read in sorted path order
(the ``encodings`` package, test folders and site-packages are left out) until the byte budget
is filled, so the corpus is the same on every machine with the same Python version.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

_SKIPPED_PARTS = {"encodings", "test", "tests", "idle_test", "site-packages", "dist-packages"}


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted relative-path order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _SKIPPED_PARTS.isdisjoint(relative.parts[:-1]):
            files.append(relative)
    return [root / p for p in sorted(files, key=lambda p: p.as_posix())]


def load_corpus(max_bytes: int = 4 * 2**20, root: Path | None = None) -> torch.Tensor:
    """Concatenate standard library sources up to ``max_bytes``.

    Args:
        max_bytes: size of the corpus in bytes.
        root: folder to read instead of the running interpreter's standard library.

    Returns:
        A uint8 tensor of byte values.

    """
    chunks: list[bytes] = []
    size = 0
    for path in stdlib_source_files(root):
        data = path.read_bytes()
        chunks.append(data[: max_bytes - size])
        size += len(chunks[-1])
        if size >= max_bytes:
            break
    if size == 0:
        raise FileNotFoundError(f"no .py files found under {root or 'the standard library'}")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()


class ByteBatches:
    """Random contiguous windows from a byte corpus, split into train and validation parts.

    Args:
        data: the corpus as uint8.
        context: tokens per sequence.
        val_fraction: the last part of the corpus held out for validation.

    """

    def __init__(self, data: torch.Tensor, context: int, val_fraction: float = 0.1):
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        split = int(len(data) * (1 - val_fraction))
        self.train = data[:split].long()
        self.val = data[split:].long()
        self.context = context
        if len(self.val) <= context + 1:
            raise ValueError(f"corpus too small for context {context}")

    def batch(self, split: str, size: int, generator: torch.Generator):
        """A batch ``(inputs, targets)`` of ``size`` windows; targets are inputs shifted by 1."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - self.context - 1, (size,), generator=generator)
        offsets = torch.arange(self.context + 1)
        windows = data[starts[:, None] + offsets]
        return windows[:, :-1], windows[:, 1:]
