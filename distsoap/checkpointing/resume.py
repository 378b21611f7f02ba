"""Checkpoint directories that survive interruption, for training loops that resume.

``save`` writes a ``torch.distributed.checkpoint`` into ``<root>/step_00000120.partial`` and,
once every rank has finished, renames it to ``<root>/step_00000120``; a crash or kill during a
save leaves only a ``.partial`` directory, which :func:`latest` never returns. So a directory
that looks like a checkpoint always holds a whole one.

Before the rename, the ranks hash what they wrote into ``integrity.json``
(:mod:`distsoap.checkpointing.integrity`). :func:`latest` returns the newest checkpoint whose files
all match it, skipping damaged ones (truncated, deleted or altered files) with a warning;
:func:`load` refuses a damaged one. With torch.distributed initialised, all three are collective:
every rank calls them, and every rank gets the same answer.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from distsoap.checkpointing import integrity
from distsoap.checkpointing.integrity import DamagedCheckpointError

__all__ = ["DamagedCheckpointError", "latest", "load", "save", "step_of"]

_NAME = re.compile(r"^step_(\d{8})$")
logger = logging.getLogger("distsoap")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(root: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Save ``state`` (model, optimizer, ...) as the checkpoint of ``step``; all ranks call it.

    Each rank then hashes the files it wrote (sha256; one more read of them, from the page cache
    as a rule) for the checkpoint's ``integrity.json``.

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
    integrity.write_manifest(partial)
    if _is_rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    _barrier()
    return final


def latest(root: str | Path, verify: bool = True) -> Path | None:
    """The newest complete, undamaged checkpoint under ``root`` (None if there is none).

    A checkpoint whose files do not match its ``integrity.json`` (or that has none) is skipped
    with a warning on the ``distsoap`` logger, and the next older one is tried. Collective when
    torch.distributed is initialised (rank 0 lists the folder; the ranks share the hashing).

    Args:
        root: the folder :func:`save` writes into.
        verify: check the files' hashes (False: the newest complete checkpoint, unchecked).
    """
    root = Path(root)
    names = None
    if _is_rank0():
        found = root.iterdir() if root.is_dir() else []
        names = sorted(p.name for p in found if _NAME.match(p.name) and (p / ".metadata").exists())
    if dist.is_initialized():
        shared = [names]
        dist.broadcast_object_list(shared, src=0)
        names = shared[0]
    for name in reversed(names):
        if not verify:
            return root / name
        found = integrity.problem(root / name)
        if found is None:
            return root / name
        if _is_rank0():
            logger.warning(
                "distsoap.checkpointing.resume: skipping damaged checkpoint %s: %s",
                root / name,
                found,
            )
    return None


def load(path: str | Path, state: dict[str, Any], verify: bool = True) -> None:
    """Fill ``state`` (shaped like what was saved) from the checkpoint at ``path``.

    Args:
        path: a checkpoint directory written by :func:`save`.
        state: what to load into, as for ``torch.distributed.checkpoint.load``.
        verify: first check every file against the checkpoint's ``integrity.json``.

    Raises:
        DamagedCheckpointError: on every rank, naming the file, if the checkpoint is damaged
            (nothing is loaded).
    """
    if verify:
        integrity.check(path)
    dcp.load(state, checkpoint_id=str(path))


def step_of(path: str | Path) -> int:
    """The step a checkpoint directory was saved at."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(
            f"{path} is not a checkpoint directory written by distsoap.checkpointing.resume.save"
        )
    return int(match.group(1))
