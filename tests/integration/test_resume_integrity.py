"""Damaged checkpoints: latest() falls back to the previous one, load() refuses them.

DCP keeps no checksums (a few flipped bytes in a .distcp file can load as wrong optimizer
state); distsoap.checkpointing.resume.save writes integrity.json and checks it before a
checkpoint is used.
"""

import logging
import os

import pytest
import torch

from distsoap.checkpointing import resume

NUMEL = 4096  # 16 KiB of data: the middle of the .distcp file is tensor bytes


def _state(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(NUMEL, generator=gen), "b": torch.arange(10.0) + step}


def _empty() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(NUMEL), "b": torch.zeros(10)}


def _flip_8_bytes(path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def _truncate(path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGES = {
    "truncated": ("__0_0.distcp", _truncate, "has"),
    "deleted": ("__0_0.distcp", os.remove, "is missing"),
    "flipped": ("__0_0.distcp", _flip_8_bytes, "does not match its sha256"),
    "metadata_flipped": (".metadata", _flip_8_bytes, "does not match its sha256"),
    "manifest_deleted": ("integrity.json", os.remove, "is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_skipped_by_latest_and_refused_by_load(tmp_path, caplog, damage):
    name, hurt, expected = DAMAGES[damage]
    for step in (1, 2):
        resume.save(tmp_path, step, _state(step))
    assert resume.latest(tmp_path) == tmp_path / "step_00000002"  # intact: the newest
    hurt(tmp_path / "step_00000002" / name)
    with caplog.at_level(logging.WARNING, logger="distsoap"):
        assert resume.latest(tmp_path) == tmp_path / "step_00000001"
    assert f"{name} {expected}" in caplog.text
    with pytest.raises(resume.DamagedCheckpointError, match=f"{name} {expected}"):
        resume.load(tmp_path / "step_00000002", _empty())
    loaded = _empty()
    resume.load(tmp_path / "step_00000001", loaded)  # the intact one loads, exactly
    for key, value in _state(1).items():
        assert torch.equal(loaded[key], value)


def test_no_checkpoint_left_when_every_one_is_damaged(tmp_path, caplog):
    resume.save(tmp_path, 1, _state(1))
    _flip_8_bytes(tmp_path / "step_00000001" / "__0_0.distcp")
    with caplog.at_level(logging.WARNING, logger="distsoap"):
        assert resume.latest(tmp_path) is None
    assert "skipping damaged checkpoint" in caplog.text


def test_verify_false_restores_the_unchecked_behaviour(tmp_path):
    resume.save(tmp_path, 1, _state(1))
    (tmp_path / "step_00000001" / "integrity.json").unlink()  # as an older distsoap saved it
    assert resume.latest(tmp_path) is None
    assert resume.latest(tmp_path, verify=False) == tmp_path / "step_00000001"
    loaded = _empty()
    resume.load(tmp_path / "step_00000001", loaded, verify=False)
    assert torch.equal(loaded["w"], _state(1)["w"])
