"""Checksums of checkpoint files, written at save and verified before a checkpoint is used.

``torch.distributed.checkpoint`` keeps no checksums: a truncated file fails to load, but a few
flipped bytes in a ``.distcp`` file load silently as wrong moments, factors or bases. When
:func:`distsoap.checkpointing.resume.save` has written a checkpoint, every rank hashes (sha256) the
data files it wrote (DCP names them ``__{rank}_{n}.distcp``) and sends the digests to rank 0, which
hashes ``.metadata`` and any file nobody claimed and writes ``integrity.json``:

    {"format": 1, "files": {name: {"size": bytes, "sha256": hex}}, "digest": sha256 of files}

:func:`problem` checks a checkpoint against it: the manifest is present and intact, every file
in it exists with its size (every rank stats every file, cheap), and its hash matches (the files
are shared out over the ranks, so each file is read once). All ranks agree on the answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch.distributed as dist

MANIFEST = "integrity.json"
FORMAT = 1
_CHUNK = 1 << 22  # 4 MiB reads


class DamagedCheckpointError(RuntimeError):
    """A checkpoint's files are missing, truncated or altered since they were saved."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def file_entry(path: Path) -> dict[str, int | str]:
    """Size and sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _files_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path) -> None:
    """Hash the checkpoint in ``directory`` and write its manifest; all ranks call it.

    Call it once every rank's files are written. Rank 0 writes the manifest.
    """
    rank = dist.get_rank() if _distributed() else 0
    world = dist.get_world_size() if _distributed() else 1
    mine = {p.name: file_entry(p) for p in sorted(directory.glob(f"__{rank}_*.distcp"))}
    gathered: list = [mine]
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return
    files = {name: entry for part in gathered for name, entry in part.items()}
    for path in sorted(directory.iterdir()):  # .metadata, and files of another naming
        if path.is_file() and path.name not in files and path.name != MANIFEST:
            files[path.name] = file_entry(path)
    manifest = {"format": FORMAT, "files": files, "digest": _files_digest(files)}
    temporary = directory / (MANIFEST + ".tmp")
    with open(temporary, "w") as stream:
        json.dump(manifest, stream, indent=1, sort_keys=True)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, directory / MANIFEST)


def _read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """The manifest's file table, or the problem with the manifest."""
    path = directory / MANIFEST
    if not path.is_file():
        return None, (
            f"{MANIFEST} is missing (deleted, or the checkpoint was saved by a distsoap "
            "without integrity manifests: load it with verify=False if you trust it)"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        intact = manifest["format"] == FORMAT and manifest["digest"] == _files_digest(files)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        intact = False
    if not intact:
        return None, f"{MANIFEST} is damaged"
    return files, None


def _local_problem(directory: Path, rank: int, world: int) -> str | None:
    """The first problem this rank finds (its share of the hashes); None if none."""
    files, problem = _read_manifest(directory)
    if problem is not None:
        return problem
    names = sorted(files)
    for name in names:
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != files[name]["size"]:
            return f"{name} has {size} bytes, {files[name]['size']} were saved (truncated?)"
    for name in names[rank::world]:
        if file_entry(directory / name)["sha256"] != files[name]["sha256"]:
            return f"{name} does not match its sha256 (its contents changed since the save)"
    return None


def problem(directory: str | Path) -> str | None:
    """What is wrong with the checkpoint in ``directory`` (None: every file as saved).

    Collective when torch.distributed is initialised (every rank calls it and gets the same
    answer: the first problem found, in rank order); otherwise it hashes every file itself.
    """
    directory = Path(directory)
    if not _distributed() or dist.get_world_size() == 1:
        return _local_problem(directory, 0, 1)
    rank, world = dist.get_rank(), dist.get_world_size()
    found = _local_problem(directory, rank, world)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, found)
    return next((p for p in gathered if p is not None), None)


def check(directory: str | Path) -> None:
    """Raise :class:`DamagedCheckpointError` (on every rank) if the checkpoint is damaged."""
    found = problem(directory)
    if found is not None:
        raise DamagedCheckpointError(
            f"checkpoint {directory} is damaged: {found}. Load an older checkpoint "
            "(distsoap.checkpointing.resume.latest skips damaged ones)."
        )
