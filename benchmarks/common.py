"""What the benchmark scripts share: shapes, contenders, the timer, the parser and the writer.

The scripts run as ``python benchmarks/bench_x.py`` from the repository root, which puts this
folder first on ``sys.path``: they ``import common`` as a sibling module. The unit tests load
this file by path (``tests/unit/test_bench_common.py``).

- ``GPT_PRESETS`` / ``gpt_shapes``: the GPT-shaped parameter sets of the step-time benchmarks,
  ``TINY_LAYERS`` / ``tiny_gpt_shapes``: the tiny ones of the host-overhead benchmarks;
- ``HPARAMS``, ``optimizers``, ``time_optimizer``: the contenders and how a step is timed;
  ``time_floor``: the products and QRs a SOAP step cannot avoid, as plain torch calls;
- ``sync``, ``time_calls`` / ``Timing``: warm-up, then rounds of calls timed between device
  synchronisations;
- ``base_parser``, ``chosen_preset``: the command-line options the scripts share;
- ``write_results``: every script's JSON, with the machine, the torch and distsoap versions, the
  date and the command next to the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import distsoap
from distsoap import SOAP, ReferenceSOAP

RESULTS = Path(__file__).resolve().parent / "results"

GPT_PRESETS: dict[str, dict[str, int]] = {
    # d_model, layers, vocab, max_precond_dim (vocab side above it: one-sided embedding)
    "cpu": dict(d_model=256, layers=4, vocab=4096, max_precond_dim=2048),
    "gpu": dict(d_model=1024, layers=12, vocab=50304, max_precond_dim=8192),
}
TINY_LAYERS = (4, 16, 64)  # 8 tensors per layer, plus the embedding and the final norm
TINY_WIDTH = 8  # d_model: every tensor is tiny (at most 32 x 8)

# SOAP's reference hyperparameters, given to every contender where they apply
HPARAMS: dict[str, Any] = dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, eps=1e-8)

_META_KEYS = ("machine", "torch", "distsoap", "date", "command")


def gpt_shapes(d_model: int, layers: int, vocab: int, **_: object) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT block stack: qkv, proj, MLP, norms, embedding, final norm.

    Args:
        d_model: The model width.
        layers: The number of blocks.
        vocab: The vocabulary size (rows of the embedding).
        **_: Other preset entries (``max_precond_dim``), ignored.

    Returns:
        The shapes, embedding first.
    """
    per_layer = [
        (3 * d_model, d_model),
        (d_model, d_model),
        (4 * d_model, d_model),
        (d_model, 4 * d_model),
        (d_model,),
        (d_model,),
        (d_model,),
        (d_model,),
    ]
    return [(vocab, d_model)] + per_layer * layers + [(d_model,), (d_model,)]


def tiny_gpt_shapes(layers: int) -> list[tuple[int, ...]]:
    """The host-overhead set: ``gpt_shapes`` at width ``TINY_WIDTH``, vocabulary 4 x width."""
    return gpt_shapes(d_model=TINY_WIDTH, layers=layers, vocab=4 * TINY_WIDTH)


def random_grads(
    shapes: Sequence[tuple[int, ...]], device: torch.device, seed: int = 1, count: int = 3
) -> list[list[torch.Tensor]]:
    """``count`` sets of standard normal gradients for ``shapes``, drawn on the CPU from ``seed``.

    Returns:
        One list of gradients per set, on ``device``.
    """
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(count)]


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (timing on CUDA); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds per call of each timed round.

    Attributes:
        times: One entry per round: the round's seconds divided by its number of calls.
    """

    times: list[float]

    @property
    def median(self) -> float:
        """The median round."""
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        """The fastest round."""
        return min(self.times)

    @property
    def mean(self) -> float:
        """The mean over rounds."""
        return statistics.fmean(self.times)


def time_calls(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 1,
    repeats: int = 5,
    number: int = 1,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls, then ``repeats`` rounds of ``number`` calls.

    Each round is timed with ``time.perf_counter`` between two ``sync(device)``, so queued device
    work is counted.

    Args:
        fn: The work to time.
        device: Where ``fn`` queues its work.
        warmup: Calls before the timed rounds (first-call costs, caches, refresh cycles).
        repeats: Timed rounds.
        number: Calls per round.
        setup: Called, untimed, before each warm-up call and before each round (new gradients).

    Returns:
        The seconds per call of each round.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        sync(device)
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / number)
    return Timing(times)


def time_optimizer(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    shapes: Sequence[tuple[int, ...]],
    grads: Sequence[Sequence[torch.Tensor]],
    frequency: int,
    cycles: int,
    device: torch.device,
) -> float:
    """Seconds per ``optimizer.step()`` over ``cycles`` refresh cycles, after one warm-up cycle.

    Args:
        make: Builds the optimizer from the parameters.
        shapes: The parameter shapes (initialised from seed 0, times 0.02).
        grads: Gradient sets, one per step in turn.
        frequency: Steps per refresh cycle (``precondition_frequency``).
        cycles: Timed refresh cycles.
        device: Where the parameters live.

    Returns:
        The mean seconds per step, refresh steps included.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.02) for s in shapes]
    opt = make(params)
    k = 0

    def step() -> None:
        nonlocal k
        for p, g in zip(params, grads[k % len(grads)]):
            p.grad = g
        opt.step()
        k += 1

    timing = time_calls(step, device, warmup=frequency + 1, repeats=1, number=cycles * frequency)
    return timing.times[0]


def time_floor(
    grads: Sequence[torch.Tensor],
    max_dim: int,
    frequency: int,
    cycles: int,
    device: torch.device,
) -> float:
    """Seconds per step of the products one SOAP step cannot avoid, refresh amortised.

    Per matrix of ``grads`` (dims above ``max_dim`` not rotated): the gradient rotated in, the
    update rotated out and the two factor products, every step; the refresh's ``GG Q`` product
    and QR per factor, once per ``frequency`` steps. Each is a plain torch call on one matrix,
    on random orthonormal bases (the time of these calls does not depend on the values).

    Args:
        grads: One gradient set (one tensor per parameter; vectors are skipped).
        max_dim: ``max_precond_dim``.
        frequency: Steps per refresh cycle.
        cycles: Refresh cycles timed.
        device: Where the tensors live.

    Returns:
        The seconds per step.
    """
    mats = [(g, [d if d <= max_dim else None for d in g.shape]) for g in grads if g.dim() == 2]
    bases = [
        [torch.linalg.qr(torch.randn(d, d, device=device))[0] if d else None for d in ds]
        for _, ds in mats
    ]
    factors = [[b @ b.T if b is not None else None for b in bs] for bs in bases]

    def per_step() -> None:
        for (g, _), (ql, qr) in zip(mats, bases):
            x = ql.T @ g if ql is not None else g  # rotate in
            x = x @ qr if qr is not None else x
            x = ql @ x if ql is not None else x  # rotate out
            x = x @ qr.T if qr is not None else x
            if ql is not None:
                g @ g.T  # factor products
            if qr is not None:
                g.T @ g

    def refresh() -> None:
        for fs, bs in zip(factors, bases):
            for f, b in zip(fs, bs):
                if f is not None:
                    torch.linalg.qr(f @ b)

    per_step()
    refresh()
    products = time_calls(per_step, device, warmup=0, repeats=1, number=cycles * frequency)
    refreshes = time_calls(refresh, device, warmup=0, repeats=1, number=cycles)
    return products.times[0] + refreshes.times[0] / frequency


def optimizers(max_dim: int, frequency: int) -> dict[str, Callable]:
    """The contenders of the step benchmarks, all with ``HPARAMS``.

    distsoap's SOAP, its per-parameter reference, torch's foreach AdamW, and the SOAP of the
    PyPI packages ``pytorch-optimizer`` and ``heavyball`` when they are installed (a line says
    which is not).

    Args:
        max_dim: ``max_precond_dim`` of the SOAPs.
        frequency: ``precondition_frequency`` of the SOAPs.

    Returns:
        Name to a function that builds the optimizer from a parameter list.
    """
    makers: dict[str, Callable] = {
        "distsoap": lambda ps: SOAP(
            ps, precondition_frequency=frequency, max_precond_dim=max_dim, **HPARAMS
        ),
        "reference (per-param)": lambda ps: ReferenceSOAP(
            ps, precondition_frequency=frequency, max_precond_dim=max_dim, **HPARAMS
        ),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, foreach=True, **HPARAMS),
    }
    try:
        from pytorch_optimizer import SOAP as PytorchOptimizerSOAP

        makers["pytorch-optimizer SOAP"] = lambda ps: PytorchOptimizerSOAP(
            ps, precondition_frequency=frequency, max_precondition_dim=max_dim, **HPARAMS
        )
    except ImportError as error:
        print(f"pytorch-optimizer not available: {error}")
    try:
        import heavyball

        heavyball.utils.compile_mode = None  # no torch.compile: measure the eager step
        makers["heavyball SOAP"] = lambda ps: heavyball.SOAP(
            ps,
            precondition_frequency=frequency,
            max_precond_dim=max_dim,
            merge_dims=False,
            use_precond_schedule=False,
            **HPARAMS,
        )
    except ImportError as error:
        print(f"heavyball not available: {error}")
    return makers


def base_parser(
    description: str,
    name: str,
    *,
    device: bool = False,
    repeats: int | None = None,
    presets: Mapping[str, object] | None = None,
    cycles: int | None = None,
) -> argparse.ArgumentParser:
    """The options the scripts share; each script adds its own.

    Args:
        description: The script's one-line summary.
        name: The results file's stem: ``--out`` defaults to ``benchmarks/results/<name>.json``.
        device: Add ``--device`` (default ``cuda`` when available, else ``cpu``).
        repeats: Add ``--repeats`` with this default (best of that many rounds).
        presets: Add ``--preset``, one of these names (default: chosen by the device).
        cycles: Add ``--frequency`` (default 10) and ``--cycles`` with this default.

    Returns:
        The parser, with ``--out`` always.
    """
    p = argparse.ArgumentParser(description=description)
    if presets is not None:
        p.add_argument("--preset", choices=sorted(presets), default=None)
    if device:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if cycles is not None:
        p.add_argument("--frequency", type=int, default=10)
        p.add_argument("--cycles", type=int, default=cycles)
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")
    return p


def chosen_preset(presets: Mapping[str, Any], name: str | None, device: torch.device) -> Any:
    """The named preset, else the device's (``gpu`` on CUDA, ``cpu`` otherwise)."""
    return presets[name or ("gpu" if device.type == "cuda" else "cpu")]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine a run is on: platform, CPU, threads, and the GPU when ``device`` is CUDA."""
    device = torch.device(device)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def run_metadata(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What every results file records besides its figures.

    Args:
        device: The device the figures were measured on.

    Returns:
        ``machine`` (see ``machine``), the ``torch`` and ``distsoap`` versions, the ``date`` (UTC,
        ISO 8601) and the ``command`` that ran.
    """
    return {
        "machine": machine(device),
        "torch": torch.__version__,
        "distsoap": distsoap.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
    }


def write_results(
    out: Path | str, figures: Mapping[Any, Any], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Write ``figures`` as JSON to ``out``, after the run's metadata (``run_metadata``).

    Args:
        out: The file; its folder is created.
        figures: The script's results (JSON-serialisable; their keys must not be metadata's).
        device: The device the figures were measured on.

    Returns:
        What was written.

    Raises:
        ValueError: A key of ``figures`` is one of the metadata's.
    """
    clash = [key for key in figures if key in _META_KEYS]
    if clash:
        raise ValueError(f"results keys {clash} are metadata keys {_META_KEYS}")
    report = {**run_metadata(device), **figures}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results written to {out}")
    return report
