"""benchmarks/common.py: the timer, device sync, the base parser and the results writer.

The module is loaded by path (the scripts import it as a sibling, ``import common``).
"""

import datetime
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

import distsoap

ROOT = Path(__file__).resolve().parents[2]


def _load_common():
    spec = importlib.util.spec_from_file_location(
        "benchmarks_common", ROOT / "benchmarks" / "common.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


common = _load_common()


def test_time_calls_calls_warmup_then_repeats_rounds_of_number():
    calls, setups = [], []
    timing = common.time_calls(
        lambda: calls.append(len(setups)),
        "cpu",
        warmup=2,
        repeats=3,
        number=4,
        setup=lambda: setups.append(None),
    )
    assert len(timing.times) == 3
    # one setup before each warm-up call and before each round, never inside a round
    assert calls == [1, 2] + [3] * 4 + [4] * 4 + [5] * 4


def test_time_calls_syncs_the_device_around_each_round(monkeypatch):
    events = []
    monkeypatch.setattr(common, "sync", lambda device: events.append(("sync", str(device))))
    common.time_calls(lambda: events.append("call"), "cuda", warmup=1, repeats=2, number=2)
    round_ = [("sync", "cuda"), "call", "call", ("sync", "cuda")]
    assert events == ["call", *round_, *round_]


def test_time_calls_measures_seconds_per_call():
    timing = common.time_calls(lambda: time.sleep(0.02), "cpu", warmup=1, repeats=3, number=3)
    # per call, not per round of 3 (0.06 s)
    assert 0.02 <= timing.median < 0.045
    assert 0.02 <= timing.best <= timing.median


def test_time_calls_setup_is_not_timed():
    timing = common.time_calls(
        lambda: None, "cpu", warmup=0, repeats=2, setup=lambda: time.sleep(0.05)
    )
    assert timing.best < 0.02


def test_timing_statistics():
    assert common.Timing([0.3, 0.1, 0.2]).median == 0.2
    assert common.Timing([0.4, 0.1, 0.2, 0.3]).median == pytest.approx(0.25)
    assert common.Timing([0.3, 0.1, 0.2]).best == 0.1
    assert common.Timing([0.3, 0.1, 0.2]).mean == pytest.approx(0.2)


def test_sync_waits_on_cuda_devices_only(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    common.sync("cpu")
    common.sync(torch.device("cpu"))
    assert synced == []
    common.sync("cuda")
    assert synced == [torch.device("cuda")]


def test_write_results_records_machine_versions_date_and_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_x.py", "--cycles", "1"])
    out = tmp_path / "new folder" / "bench_x.json"
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    common.write_results(out, {"rows": [{"ms": 1.5}], 2: {"bytes": 10}}, torch.device("cpu"))
    after = datetime.datetime.now(datetime.timezone.utc)
    written = json.loads(out.read_text())
    assert written["torch"] == torch.__version__
    assert written["distsoap"] == distsoap.__version__
    assert before <= datetime.datetime.fromisoformat(written["date"]) <= after
    assert written["command"] == "benchmarks/bench_x.py --cycles 1"
    machine = written["machine"]
    assert machine["platform"] and machine["cpu"]
    assert machine["device"] == "cpu"
    assert machine["gpu"] is None
    assert machine["torch_threads"] == torch.get_num_threads()
    assert written["rows"] == [{"ms": 1.5}]
    assert written["2"] == {"bytes": 10}


def test_machine_names_the_gpu_of_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
    assert common.machine("cuda")["gpu"] == "Fake GPU 80GB"
    assert common.machine("cuda")["device"] == "cuda"
    assert common.machine("cpu")["gpu"] is None


def test_write_results_refuses_figures_that_would_hide_metadata(tmp_path):
    with pytest.raises(ValueError, match="torch"):
        common.write_results(tmp_path / "x.json", {"torch": "mine"})
    assert not (tmp_path / "x.json").exists()


def test_base_parser_shared_options():
    p = common.base_parser(
        "d", "bench_x", device=True, repeats=3, presets=common.GPT_PRESETS, cycles=4
    )
    args = p.parse_args([])
    assert args.out == ROOT / "benchmarks" / "results" / "bench_x.json"
    assert (args.repeats, args.cycles, args.frequency, args.preset) == (3, 4, 10, None)
    assert args.device in ("cpu", "cuda")
    assert p.parse_args(["--preset", "gpu"]).preset == "gpu"
    bare = common.base_parser("d", "bench_y").parse_args([])
    assert vars(bare) == {"out": ROOT / "benchmarks" / "results" / "bench_y.json"}


def test_gpt_shapes():
    shapes = common.gpt_shapes(**common.GPT_PRESETS["cpu"])
    assert len(shapes) == 1 + 8 * 4 + 2
    assert shapes[0] == (4096, 256)
    assert len(common.tiny_gpt_shapes(16)) == 1 + 8 * 16 + 2


def test_time_floor_times_the_products_of_the_rotated_dims_only(monkeypatch):
    """The floor's refresh QRs one ``GG Q`` per rotated dim; vectors and dims above the cap none."""
    shapes = []
    real_qr = torch.linalg.qr

    def recording_qr(matrix):
        shapes.append(tuple(matrix.shape))
        return real_qr(matrix)

    grads = [torch.randn(6, 4), torch.randn(8), torch.randn(3, 5)]
    monkeypatch.setattr(torch.linalg, "qr", recording_qr)
    seconds = common.time_floor(grads, max_dim=5, frequency=2, cycles=3, device="cpu")
    assert seconds > 0
    # the random bases (one per rotated dim), then the refresh: 1 untimed + 3 timed cycles
    rotated = [(4, 4), (3, 3), (5, 5)]
    assert shapes == rotated + rotated * 4
