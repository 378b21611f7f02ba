"""Optimizer state in and out: state dicts, their checks, consolidation and resumable checkpoints.

- :mod:`.state_dict`: the state dict format (one entry per parameter, any world size).
- :mod:`.load_checks`: what a loaded state dict must satisfy, agreed on by every rank.
- :mod:`.state_dtypes`: state tensors converted to the dtypes this optimizer keeps.
- :mod:`.consolidate`: every rank's block states gathered onto one rank.
- :mod:`.integrity`: checksums of a checkpoint's files.
- :mod:`.resume`: checkpoint directories that survive interruption (save, latest, load).
"""
