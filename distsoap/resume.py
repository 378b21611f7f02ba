"""Checkpoint directories that survive interruption, for training loops that resume.

``save`` writes a ``torch.distributed.checkpoint`` into ``<root>/step_00000120.partial`` and,
once every rank has finished, renames it to ``<root>/step_00000120``; a crash or kill during a
save leaves only a ``.partial`` directory, which :func:`latest` never returns. So a directory
that looks like a checkpoint always holds a whole one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

_NAME = re.compile(r"^step_(\d{8})$")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(root: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Save ``state`` (model, optimizer, ...) as the checkpoint of ``step``; all ranks call it.

    Returns:
        The final directory.
    """
    root = Path(root)
    final = root / f"step_{step:08d}"
    partial = final.with_name(final.name + ".partial")
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier interrupted save
    _barrier()
    dcp.save(state, checkpoint_id=str(partial))
    _barrier()  # every rank's files are written
    if _is_rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    _barrier()
    return final


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir() if _NAME.match(p.name) and (p / ".metadata").exists()]
    return max(complete, key=lambda p: p.name, default=None)


def load(path: str | Path, state: dict[str, Any]) -> None:
    """Fill ``state`` (shaped like what was saved) from the checkpoint at ``path``."""
    dcp.load(state, checkpoint_id=str(path))


def step_of(path: str | Path) -> int:
    """The step a checkpoint directory was saved at."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory written by distsoap.resume.save")
    return int(match.group(1))
