"""What each rank runs in tests/distributed/test_resume_integrity.py (importable by spawned ranks).

Every rank saves its own tensor (under its own key, so each rank writes a data file), two
checkpoints; rank 0 then damages rank 1's data file of the newer one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from distsoap.checkpointing import resume

NUMEL = 4096


def _state(rank: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return {f"rank{rank}": torch.randn(NUMEL, generator=gen)}


def damaged_newest(rank: int, world: int, root: str) -> dict:
    """Save steps 1 and 2, flip 8 bytes of rank 1's file of step 2; resume on every rank."""
    root = Path(root)
    for step in (1, 2):
        resume.save(root, step, _state(rank, step))
    intact = resume.latest(root)
    damaged = root / "step_00000002" / "__1_0.distcp"
    if rank == 0:
        data = bytearray(damaged.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
        damaged.write_bytes(bytes(data))
    dist.barrier()
    found = resume.latest(root)
    try:
        resume.load(root / "step_00000002", {f"rank{rank}": torch.zeros(NUMEL)})
        error = "no error"
    except resume.DamagedCheckpointError as caught:
        error = str(caught)
    loaded = {f"rank{rank}": torch.zeros(NUMEL)}
    resume.load(found, loaded)
    return {
        "intact": intact.name,
        "found": found.name,
        "error": error,
        "exact": torch.equal(loaded[f"rank{rank}"], _state(rank, 1)[f"rank{rank}"]),
    }
