"""distsoap.checkpointing.resume at 2 gloo ranks: a damaged checkpoint is skipped and refused
everywhere."""

from distsoap.testing.local_ranks import run_ranks
from tests.distributed.resume_scenarios import damaged_newest


def test_damage_in_another_ranks_file_is_seen_by_every_rank(tmp_path):
    results = run_ranks(damaged_newest, 2, str(tmp_path), timeout=120)
    for result in results:
        assert result["intact"] == "step_00000002"  # before the damage: the newest
        assert result["found"] == "step_00000001"  # after: the previous one, on every rank
        assert "__1_0.distcp does not match its sha256" in result["error"]
        assert result["error"] == results[0]["error"]
        assert result["exact"]  # the intact checkpoint loads exactly
