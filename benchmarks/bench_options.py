r"""SOAP's state and refresh options on bench_step's GPT-shaped set: step, refresh time, state.

For every configuration (the default, each option alone, the lean combination, and as peers the
per-parameter reference and torch's AdamW, and the floor) one run measures, on the same gradients:

- the time of one ``optimizer.step()``, mean over ``--cycles`` refresh cycles after a warm-up
  cycle (the first call and ``precondition_frequency`` updates), as bench_step times it;
- the refresh time per step: the seconds spent in ``opt.engine.finish_refreshes`` (the
  eigenbasis refreshes, and the adaptive refresh's test) over the same cycles, divided by the
  number of steps;
- the SOAP state bytes per parameter (``opt.state_bytes()``; for the peers, the bytes of the
  tensors in their state), and the refreshes the adaptive refresh skipped.

The configurations: ``default``; each option alone (``bf16_factors``, ``bf16_bases``,
``bf16_both``, ``block<b>`` for ``--blocks``, ``one_sided``, ``adaptive<t>`` for
``--tolerances``, ``bf16_moments``); ``lean``: bf16 factors and bases, ``block_size``
``--lean-block`` (256) and ``refresh_tolerance`` ``--lean-tolerance`` (0.1), with
``lean_tol<t>`` (``lean_b<b>_tol<t>``) for the ``--lean-variants`` tolerances ``t`` (``b:t``:
another block size too); the peers ``reference`` and ``adamw``; and ``floor``, the products and
QRs one SOAP step cannot avoid timed as plain torch calls on the same shapes (``common.time_floor``,
bench_step's floor), the yardstick of how far the default's step can still fall.
``--masses default,...`` first traces, untimed, the off-diagonal mass before each refresh of
these configurations (what the adaptive refresh compares with its tolerance) and after it.

Configurations are measured in ``--rounds`` rounds, in a rotated order each round; a ratio to
the reference or to the default is taken within one round, and the median and range over rounds
are printed (this 2-core machine's timings are noisy).

Gradients (``--grads``): ``real`` (default) records them from a short training run of the demo's
GPT at bench_step's CPU shapes (d_model 256, 4 layers, vocabulary 4096; byte inputs, so only the
tied output head trains the rows above 255), trained with default SOAP, and replays them to
every configuration, so the Kronecker factors, which depend on the gradients only, are those of
real training; ``random`` replays bench_step's three standard normal sets in turn, whose factors
settle towards one fixed matrix (the same three outer products over and over), so the adaptive
refresh skips far more there than on real gradients.

    python benchmarks/bench_options.py --rounds 0 --masses default,lean_tol0.001 \
        --out benchmarks/results/bench_options_masses.json
    python benchmarks/bench_options.py                   # every configuration, 3 rounds
    python benchmarks/bench_options.py --configs reference,default,lean,lean_tol0.001,block256 \
        --rounds 7 --out benchmarks/results/bench_options_step.json
    python benchmarks/bench_options.py --grads random \
        --configs reference,default,lean,lean_tol0.001,block256 --rounds 7 \
        --out benchmarks/results/bench_options_step_random.json
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    GPT_PRESETS,
    HPARAMS,
    base_parser,
    chosen_preset,
    gpt_shapes,
    random_grads,
    sync,
    time_floor,
    write_results,
)

from distsoap import SOAP, ReferenceSOAP
from distsoap.demo.corpus import ByteBatches, load_corpus
from distsoap.demo.model import GPT, GPTConfig
from distsoap.demo.train import lr_factor
from distsoap.math.adaptive import off_diagonal_mass


def option_sets(
    blocks: Sequence[int],
    tolerances: Sequence[float],
    lean_block: int,
    lean_tolerance: float,
    lean_variants: Sequence[tuple[int | None, float]] = (),
) -> dict[str, dict[str, Any]]:
    """The SOAP configurations by name: the options each adds to the default.

    Args:
        blocks: The ``block_size`` values measured alone (``block<b>``).
        tolerances: The ``refresh_tolerance`` values measured alone (``adaptive<t>``).
        lean_block: The lean combination's ``block_size``.
        lean_tolerance: The lean combination's ``refresh_tolerance``.
        lean_variants: Other ``(block_size, refresh_tolerance)`` of the lean combination:
            ``lean_tol<t>`` with ``lean_block`` where the block size is None, else
            ``lean_b<b>_tol<t>``.

    Returns:
        Name to SOAP keyword arguments.
    """
    sets: dict[str, dict[str, Any]] = {
        "default": {},
        "bf16_factors": dict(factor_dtype="bf16"),
        "bf16_bases": dict(basis_dtype="bf16"),
        "bf16_both": dict(factor_dtype="bf16", basis_dtype="bf16"),
    }
    sets |= {f"block{b}": dict(block_size=b) for b in blocks}
    sets["one_sided"] = dict(one_sided=True)
    sets |= {f"adaptive{t:g}": dict(refresh_tolerance=t) for t in tolerances}
    sets["bf16_moments"] = dict(moment_dtype="bf16")
    lean = dict(factor_dtype="bf16", basis_dtype="bf16", block_size=lean_block)
    sets["lean"] = lean | dict(refresh_tolerance=lean_tolerance)
    for b, t in lean_variants:
        name = f"lean_tol{t:g}" if b is None else f"lean_b{b}_tol{t:g}"
        sets[name] = lean | dict(block_size=b or lean_block, refresh_tolerance=t)
    return sets


def lean_variant(text: str) -> tuple[int | None, float]:
    """``"t"`` -> (None, t); ``"b:t"`` -> (b, t)."""
    block, _, tolerance = text.rpartition(":")
    return (int(block) if block else None), float(tolerance)


def makers(
    sets: dict[str, dict[str, Any]], max_dim: int, frequency: int
) -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    """Builders of every configuration and of the peers, all with bench_step's ``HPARAMS``."""
    soap = dict(precondition_frequency=frequency, max_precond_dim=max_dim, **HPARAMS)
    built: dict[str, Callable] = {
        name: (lambda ps, options=options: SOAP(ps, **soap, **options))
        for name, options in sets.items()
    }
    built["reference"] = lambda ps: ReferenceSOAP(ps, **soap)
    built["adamw"] = lambda ps: torch.optim.AdamW(ps, foreach=True, **HPARAMS)
    return built


def demo_gpt(preset: dict[str, int]) -> GPT:
    """The demo's GPT at a preset's width, depth and vocabulary (4 heads, context 128)."""
    cfg = GPTConfig(
        vocab_size=preset["vocab"], d_model=preset["d_model"], n_layers=preset["layers"]
    )
    return GPT(cfg)


def real_grads(
    preset: dict[str, int],
    count: int,
    train_steps: int,
    batch_size: int,
    frequency: int,
    seed: int = 0,
) -> list[list[torch.Tensor]]:
    """Gradients of a real training run at the preset's shapes, for replay.

    The demo's GPT (seeded init) trains on the demo corpus with default SOAP (bench_step's
    hyperparameters, a linear warm-up over the first 5% of the steps, then cosine to 0 at
    ``train_steps + count``, gradient clipping 1.0); after ``train_steps`` steps the next
    ``count`` steps' clipped gradients are recorded. The position embedding (not in bench_step's
    set) trains but is not recorded, so the recorded shapes are exactly ``gpt_shapes(preset)``.

    Args:
        preset: A ``GPT_PRESETS`` entry.
        count: Gradient sets to record.
        train_steps: Training steps before recording.
        batch_size: Sequences of 128 bytes per step.
        frequency: SOAP's ``precondition_frequency`` for the training run.
        seed: Fixes the initialisation and the data order.

    Returns:
        ``count`` lists of gradients, in the model's parameter order without the position
        embedding.
    """
    torch.manual_seed(seed)
    model = demo_gpt(preset)
    names = [n for n, _ in model.named_parameters() if n != "positions.weight"]
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if n in names]
    if sorted(shapes) != sorted(gpt_shapes(**preset)):
        raise RuntimeError("the demo GPT's shapes are not bench_step's")
    opt = SOAP(
        model.parameters(),
        precondition_frequency=frequency,
        max_precond_dim=preset["max_precond_dim"],
        **HPARAMS,
    )
    total = train_steps + count
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, 0.05))
    data = ByteBatches(load_corpus(), model.cfg.context)
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    recorded = []
    start = time.perf_counter()
    for step in range(total):
        x, y = data.batch("train", batch_size, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step >= train_steps:
            recorded.append([params[n].grad.detach().clone() for n in names])
        opt.step()
        sched.step()
        if (step + 1) % 20 == 0 or step + 1 == total:
            print(
                f"  gradient run: step {step + 1}/{total}, loss {loss.item():.3f}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
    return recorded


@dataclass
class Measured:
    """One configuration in one round.

    Attributes:
        step_ms: Mean milliseconds per ``optimizer.step()`` over the timed cycles.
        refresh_ms: Milliseconds in ``finish_refreshes`` per timed step (None for the peers).
        state_bytes: Bytes of optimizer state after the run (None for the floor).
        skipped: Refreshes skipped by the adaptive refresh in the timed cycles (parameters).
        due: Refreshes due in the timed cycles (parameters with a factored dim x cycles).
        fallbacks: Blocks whose bf16 bases the drift guard sent back to fp32.
    """

    step_ms: float
    refresh_ms: float | None
    state_bytes: int | None
    skipped: int
    due: int
    fallbacks: int


def tensor_bytes(value: object) -> int:
    """Bytes of the tensors in ``value``, looking into lists and tuples (the reference's)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """``opt.state_bytes()`` for SOAP; the bytes of the tensors in the state of the others."""
    if isinstance(opt, SOAP):
        return opt.state_bytes()
    return sum(tensor_bytes(v) for s in opt.state.values() for v in s.values())


def state_count(opt: torch.optim.Optimizer, key: str) -> int:
    """The sum over parameters of a per-parameter state counter (0 where absent)."""
    return sum(int(s.get(key, 0)) for s in opt.state.values())


def measure(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    grads: Sequence[Sequence[torch.Tensor]],
    frequency: int,
    cycles: int,
    device: torch.device,
) -> Measured:
    """Step ``1 + frequency`` times untimed, then time ``cycles * frequency`` steps.

    Parameters start from seed 0 (times 0.02); step ``k`` gets gradient set ``k`` (cyclically).
    The refresh time is that of ``opt.engine.finish_refreshes``, wrapped on the instance.
    """
    gen = torch.Generator().manual_seed(0)
    shapes = [g.shape for g in grads[0]]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.02) for s in shapes]
    opt = make(params)
    refresh = [0.0]
    engine = getattr(opt, "engine", None)
    if engine is not None:
        finish = engine.finish_refreshes

        def timed_finish() -> None:
            sync(device)
            start = time.perf_counter()
            finish()
            sync(device)
            refresh[0] += time.perf_counter() - start

        engine.finish_refreshes = timed_finish

    def step(k: int) -> None:
        for p, g in zip(params, grads[k % len(grads)]):
            p.grad = g
        opt.step()

    warm = frequency + 1
    for k in range(warm):
        step(k)
    refresh[0] = 0.0
    skipped = state_count(opt, "skipped_refreshes")
    timed = cycles * frequency
    sync(device)
    start = time.perf_counter()
    for k in range(warm, warm + timed):
        step(k)
    sync(device)
    seconds = time.perf_counter() - start
    factored = sum(1 for p in params if p.dim() >= 2)
    result = Measured(
        step_ms=seconds / timed * 1e3,
        refresh_ms=refresh[0] / timed * 1e3 if engine is not None else None,
        state_bytes=state_bytes(opt),
        skipped=state_count(opt, "skipped_refreshes") - skipped,
        due=factored * cycles if engine is not None else 0,
        fallbacks=state_count(opt, "basis_fallbacks"),
    )
    return result


def measure_floor(
    grads: Sequence[Sequence[torch.Tensor]],
    max_dim: int,
    frequency: int,
    cycles: int,
    device: torch.device,
) -> Measured:
    """The floor (``common.time_floor``) over the same cycles, as a peer: no state, no refresh."""
    step = time_floor(grads[0], max_dim, frequency, cycles, device)
    return Measured(
        step_ms=step * 1e3, refresh_ms=None, state_bytes=None, skipped=0, due=0, fallbacks=0
    )


def masses(opt: SOAP) -> list[float]:
    """Per parameter with a factored dim: the adaptive refresh's off-diagonal mass now.

    The largest over its blocks and factored dims of ``||Q^T GG Q - diag||_F^2 / ||Q^T GG
    Q||_F^2`` (``distsoap.math.adaptive.off_diagonal_mass``), from the state's factors and bases.
    """
    out = []
    for state in opt.state.values():
        dims = sorted(int(k[7:]) for k in state if k.startswith("factor_"))
        if not dims:
            continue
        factors, bases = [], []
        for d in dims:
            f, q = state[f"factor_{d}"], state[f"basis_{d}"]
            if f.dim() == 2:
                f, q = f[None], q[None]
            factors.append(f)
            bases.append(q)
        out.append(float(off_diagonal_mass(factors, bases).max()))
    return out


def mass_trace(
    make: Callable[[list[torch.nn.Parameter]], SOAP],
    grads: Sequence[Sequence[torch.Tensor]],
    frequency: int,
    cycles: int,
) -> list[dict[str, list[float]]]:
    """The off-diagonal masses (``masses``) around each due refresh of the timed cycles.

    Untimed: the same steps as ``measure``, with ``finish_refreshes`` wrapped to read the masses
    before and after it on the steps where refreshes are due (the update counter a multiple of
    ``frequency``): ``before`` is what the adaptive refresh tests, ``after`` what a refresh
    leaves (one power-iteration step with QR does not diagonalise a factor exactly).

    Returns:
        Per refresh: ``{"before": [...], "after": [...]}``, one figure per parameter with a
        factored dim.
    """
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(g.shape, generator=gen) * 0.02) for g in grads[0]]
    opt = make(params)
    finish = opt.engine.finish_refreshes
    trace: list[dict[str, list[float]]] = []

    def traced_finish() -> None:
        update = max((int(s.get("step", 0)) for s in opt.state.values()), default=0)
        if update > frequency and update % frequency == 0:  # after the warm-up cycle
            before = masses(opt)
            finish()
            trace.append({"before": before, "after": masses(opt)})
        else:
            finish()

    opt.engine.finish_refreshes = traced_finish
    for k in range(1 + frequency * (1 + cycles)):
        for p, g in zip(params, grads[k % len(grads)]):
            p.grad = g
        opt.step()
    return trace


def print_trace(name: str, trace: list[dict[str, list[float]]]) -> None:
    """Quantiles over parameters of the masses before and after each refresh."""
    for i, event in enumerate(trace):
        parts = []
        for when in ("before", "after"):
            q = torch.tensor(event[when]).quantile(torch.tensor([0.0, 0.5, 1.0])).tolist()
            parts.append(f"{when} {q[0]:.1e} / {q[1]:.1e} / {q[2]:.1e}")
        below = [sum(m < t for m in event["before"]) for t in (1e-3, 1e-2, 3e-2, 1e-1)]
        print(
            f"{name} refresh {i + 1}: off-diagonal mass min / median / max: "
            + ", ".join(parts)
            + f"; of {len(event['before'])} below 1e-3/1e-2/3e-2/1e-1 before: "
            + "/".join(map(str, below)),
            flush=True,
        )


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max."""
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def fmt(s: dict[str, float] | None, digits: int = 2) -> str:
    """``median [min, max]``."""
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def summarise(
    rounds: list[dict[str, Measured]], n_params: int, names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per configuration: spreads over rounds of the times and of the in-round ratios."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = [r[name] for r in rounds]
        state = runs[-1].state_bytes
        row: dict[str, Any] = {
            "step_ms": spread([m.step_ms for m in runs]),
            "state_bytes": state,
            "state_bytes_per_param": None if state is None else state / n_params,
            "skipped": [m.skipped for m in runs],
            "due": runs[-1].due,
            "basis_fallbacks": runs[-1].fallbacks,
        }
        if runs[0].refresh_ms is not None:
            row["refresh_ms_per_step"] = spread([m.refresh_ms for m in runs])
        peers = (
            ("reference", "step_x_reference"),
            ("default", "step_x_default"),
            ("floor", "step_x_floor"),
        )
        for peer, key in peers:
            if peer in rounds[0] and name != peer:
                row[key] = spread([r[name].step_ms / r[peer].step_ms for r in rounds])
        if "default" in rounds[0] and name != "default" and runs[0].refresh_ms is not None:
            ref = [r["default"].refresh_ms for r in rounds]
            if all(ref):
                row["refresh_x_default"] = spread(
                    [r[name].refresh_ms / d for r, d in zip(rounds, ref)]
                )
        if "default" in rounds[0] and state is not None:
            row["state_x_default"] = state / rounds[-1]["default"].state_bytes
        out[name] = row
    return out


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    """The summary as a text table (median [min, max] over rounds)."""
    header = (
        f"{'config':14s} {'step ms':>22s} {'x reference':>20s} {'x default':>20s} {'x floor':>20s} "
        f"{'refresh ms/step':>22s} {'refresh x default':>20s} {'B/param':>8s} "
        f"{'state x def':>11s} {'skipped/due':>12s} {'fallbk':>6s}"
    )
    print("\n" + header)
    for name, row in summary.items():
        skipped = f"{statistics.median(row['skipped']):g}/{row['due']}" if row["due"] else "-"
        state_x = row.get("state_x_default")
        per_param = row["state_bytes_per_param"]
        per_param = "-" if per_param is None else f"{per_param:.2f}"
        print(
            f"{name:14s} {fmt(row['step_ms'], 1):>22s} {fmt(row.get('step_x_reference')):>20s} "
            f"{fmt(row.get('step_x_default')):>20s} {fmt(row.get('step_x_floor')):>20s} "
            f"{fmt(row.get('refresh_ms_per_step'), 1):>22s} "
            f"{fmt(row.get('refresh_x_default')):>20s} {per_param:>8s} "
            f"{'-' if state_x is None else f'{state_x:.3f}':>11s} {skipped:>12s} "
            f"{row['basis_fallbacks']:6d}"
        )


def main() -> None:
    p = base_parser(
        __doc__.splitlines()[0],
        "bench_options",
        device=True,
        repeats=None,
        presets=GPT_PRESETS,
        cycles=5,
    )
    p.add_argument("--configs", default="all", help="comma-separated names, or 'all'")
    p.add_argument("--rounds", type=int, default=3, help="0: record / trace only")
    p.add_argument("--grads", choices=("real", "random"), default="real")
    p.add_argument("--train-steps", type=int, default=100, help="real: steps before recording")
    p.add_argument("--batch-size", type=int, default=16, help="real: sequences per step")
    p.add_argument(
        "--grads-cache",
        type=Path,
        default=None,
        help="real: load the recorded gradients from this file, or record and save them there",
    )
    p.add_argument("--blocks", default="128,256,512", help="block_size values alone")
    p.add_argument("--tolerances", default="1e-3,1e-2,3e-2,1e-1", help="refresh_tolerance alone")
    p.add_argument("--lean-block", type=int, default=256)
    p.add_argument("--lean-tolerance", type=float, default=0.1)
    p.add_argument(
        "--lean-variants", default="1e-3,3e-2", help="other lean tolerances t, or b:t pairs"
    )
    p.add_argument(
        "--masses",
        default="",
        help="comma-separated SOAP configs whose off-diagonal masses around each refresh are "
        "traced first, untimed",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    preset = chosen_preset(GPT_PRESETS, args.preset, device)
    sets = option_sets(
        [int(b) for b in args.blocks.split(",") if b],
        [float(t) for t in args.tolerances.split(",") if t],
        args.lean_block,
        args.lean_tolerance,
        [lean_variant(v) for v in args.lean_variants.split(",") if v],
    )
    built = makers(sets, preset["max_precond_dim"], args.frequency)
    known = [*built, "floor"]
    names = known if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {sorted(known)}")

    count = 1 + args.frequency * (1 + args.cycles)
    start = time.perf_counter()
    if args.grads == "real":
        recipe = dict(
            preset=preset,
            count=count,
            train_steps=args.train_steps,
            batch_size=args.batch_size,
            frequency=args.frequency,
        )
        cached = None
        if args.grads_cache is not None and args.grads_cache.exists():
            cached = torch.load(args.grads_cache)
            if cached["recipe"] != recipe:
                p.error(f"{args.grads_cache} holds other gradients: {cached['recipe']}")
        if cached is None:
            cached = dict(recipe=recipe, grads=real_grads(**recipe))
            if args.grads_cache is not None:
                torch.save(cached, args.grads_cache)
        grads = [[g.to(device) for g in gs] for gs in cached["grads"]]
    else:
        grads = random_grads(gpt_shapes(**preset), device)
    n_params = sum(g.numel() for g in grads[0])
    print(
        f"{len(grads[0])} tensors, {n_params / 1e6:.2f}M params, preset {preset}, {device}, "
        f"{args.grads} gradients ({len(grads)} sets, {time.perf_counter() - start:.0f} s)"
    )

    traces = {}
    for name in [n for n in args.masses.split(",") if n]:
        traces[name] = mass_trace(built[name], grads, args.frequency, args.cycles)
        print_trace(name, traces[name])

    rounds: list[dict[str, Measured]] = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        measured = {}
        for name in order:
            if name == "floor":
                measured[name] = measure_floor(
                    grads, preset["max_precond_dim"], args.frequency, args.cycles, device
                )
            else:
                measured[name] = measure(built[name], grads, args.frequency, args.cycles, device)
            gc.collect()  # the last configuration's optimizer and parameters
            m = measured[name]
            refresh = "" if m.refresh_ms is None else f", refresh {m.refresh_ms:.1f} ms/step"
            state = "" if m.state_bytes is None else f", {m.state_bytes / n_params:.2f} B/param"
            print(
                f"round {r + 1}/{args.rounds} {name:14s} step {m.step_ms:7.1f} ms{refresh}"
                f"{state}, skipped {m.skipped}/{m.due}",
                flush=True,
            )
        rounds.append({n: measured[n] for n in names})
    summary = summarise(rounds, n_params, names) if rounds else {}
    if summary:
        print_table(summary)
    figures = dict(
        preset=preset,
        grads=args.grads,
        train_steps=args.train_steps if args.grads == "real" else None,
        frequency=args.frequency,
        cycles=args.cycles,
        rounds=args.rounds,
        n_params=n_params,
        options={n: sets.get(n, n) for n in names},
        summary=summary,
        masses=traces,
        per_round=[{n: vars(m) for n, m in r.items()} for r in rounds],
    )
    write_results(args.out, figures, device)


if __name__ == "__main__":
    main()
