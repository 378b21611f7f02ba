"""HF Transformers Trainer: checkpoints that keep every rank's SOAP state.

Under torchrun with DDP the Trainer writes ``optimizer.pt`` from rank 0 alone
(``optimizer.state_dict()`` is called on rank 0 only) and every rank loads that file on
resume. With SOAP's state sharded over the ranks, rank 0's state dict would hold only the
blocks rank 0 owns. This callback gathers every rank's state onto rank 0 just before the
Trainer saves, on every rank, so ``optimizer.pt`` is complete and a resumed run continues
exactly::

    from distsoap.integrations.hf import SOAPCheckpointCallback

    trainer = Trainer(..., optimizers=(soap, scheduler), callbacks=[SOAPCheckpointCallback()])

Without it, resuming from such a file raises a ValueError on every rank (SOAP refuses a state
dict that lacks blocks this rank owns) instead of restarting those blocks from empty state.
With DeepSpeed (``"type": "SOAP"`` in the JSON) the Trainer saves through DeepSpeed and the
callback is not needed; it does nothing there, nor for a single process.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from distsoap.optimizer import SOAP


def find_soap(optimizer: Any) -> SOAP | None:
    """The SOAP inside the Trainer's optimizer (Accelerate wraps it), or None."""
    for _ in range(4):
        if isinstance(optimizer, SOAP):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class SOAPCheckpointCallback(TrainerCallback):
    """Consolidate SOAP's sharded state on rank 0 whenever the Trainer is about to save.

    The Trainer decides to save in ``on_step_end`` / ``on_epoch_end`` (its flow callback sets
    ``control.should_save``, and callbacks run in order, the flow callback first) and saves
    right after them, on every rank; with ``save_strategy="best"`` the decision comes after an
    evaluation, so the state is gathered at every evaluation then.
    """

    def _consolidate(self, args: TrainingArguments, optimizer: Any) -> None:
        if getattr(args, "deepspeed", None):  # DeepSpeed saves every rank's partition itself
            return
        soap = find_soap(optimizer)
        if soap is not None:
            soap.consolidate_state_dict(to=0)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Gather when the checkpoint about to be written (this step's, or this epoch's) is due."""
        if control.should_save:
            self._consolidate(args, kwargs.get("optimizer"))

    on_epoch_end = on_step_end  # an epoch-end save is decided the same way, just before it

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """``save_strategy="best"`` decides after evaluating: gather in case it saves."""
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best":
            self._consolidate(args, kwargs.get("optimizer"))
