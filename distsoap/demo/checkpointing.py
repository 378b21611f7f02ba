"""Checkpoints for the demo's training runs: save every N steps, resume automatically.

Each run (``soap``, ``adamw``) keeps its own folder under ``--checkpoint-dir``. A checkpoint
holds the model and optimizer (torch.distributed.checkpoint's ``get_state_dict``, so it works
for every strategy and reshards), the data generator's state, the scheduler and the losses so
far; a finished run leaves ``result.json`` and is not trained again. Writes go through
:mod:`distsoap.checkpointing.resume`, so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from distsoap.checkpointing import resume


class RunCheckpoints:
    """Save and restore one training run.

    Args:
        root: the run's folder (None: no checkpoints).
        every: save after every this many steps.
    """

    def __init__(self, root: Path | None, every: int):
        self.root = root
        self.every = every

    @property
    def enabled(self) -> bool:
        """Whether this run is checkpointed."""
        return self.root is not None

    def finished(self) -> dict | None:
        """The result (as a dict) of a run that already finished, if any."""
        if self.root is None or not (self.root / "result.json").exists():
            return None
        return json.loads((self.root / "result.json").read_text())

    def mark_finished(self, result) -> None:
        """Record a finished run (rank 0 writes)."""
        if self.root is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            (self.root / "result.json").write_text(json.dumps(asdict(result)))

    def _state(self, model, optimizer, scheduler, generator, result, step) -> dict:
        model_state, optim_state = get_state_dict(model, optimizer)
        progress = {"step": step, "scheduler": scheduler.state_dict(), "result": asdict(result)}
        return {
            "model": model_state,
            "optim": optim_state,
            "generator": generator.get_state(),
            "progress": json.dumps(progress),
        }

    def maybe_save(self, model, optimizer, scheduler, generator, result, step: int) -> None:
        """Save after ``step`` steps when it is a multiple of ``every``."""
        if self.root is not None and step % self.every == 0:
            resume.save(
                self.root, step, self._state(model, optimizer, scheduler, generator, result, step)
            )

    def restore(self, model, optimizer, scheduler, generator, result) -> int:
        """Load the newest checkpoint into the run's objects; return the steps already done."""
        path = resume.latest(self.root) if self.root is not None else None
        if path is None:
            return 0
        state = self._state(model, optimizer, scheduler, generator, result, 0)
        resume.load(path, state)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        generator.set_state(state["generator"])
        progress = json.loads(state["progress"])
        scheduler.load_state_dict(progress["scheduler"])
        for key, value in progress["result"].items():
            setattr(result, key, value)
        return int(progress["step"])
