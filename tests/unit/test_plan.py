"""The memory planner (distsoap/plan) against the state a real SOAP optimizer allocates.

Each check builds the same model on the CPU, plans it, builds SOAP with the planner's param
groups and options, takes one step with gradients (which allocates every block) and compares
``state_bytes()`` and its split, per rank: single process, ``ddp`` on 2 gloo ranks, and
``fsdp2`` / ``fsdp2_local`` on 3 (uneven shards, an empty expert shard; under ``fsdp2`` also
the bytes each rank sent for the round trip of split parameters' rows).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from distsoap import SOAP
from distsoap.engine.blocks import make_block_spec
from distsoap.plan import PlanError, PlanOptions, build_model, param_groups, plan
from distsoap.plan.__main__ import main
from distsoap.plan.costs import block_state
from distsoap.plan.planner import SPLIT
from distsoap.testing.local_ranks import run_ranks


class Mixed(nn.Module):
    """Every kind of block: matrix, 1-D, conv, wide, expert stack, empty, frozen."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 20)
        self.conv = nn.Parameter(torch.randn(8, 6, 3, 3))
        self.wide = nn.Parameter(torch.randn(7, 50))
        self.experts = nn.Parameter(torch.randn(4, 10, 10))
        self.empty = nn.Parameter(torch.randn(0, 5))
        self.frozen = nn.Parameter(torch.randn(6, 6), requires_grad=False)


def _model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = Mixed() if name == "mixed" else build_model(name, device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # the same values on every rank (ddp checks them)
            p.normal_()
    return model.to(dtype)


def _soap_kwargs(options: PlanOptions) -> dict:
    kwargs = dict(
        max_precond_dim=options.max_precond_dim,
        merge_dims=options.merge_dims,
        precondition_1d=options.precondition_1d,
        one_sided=options.one_sided,
        data_format=options.data_format,
        moment_dtype=options.moment_dtype,
        factor_dtype=options.factor_dtype,
        basis_dtype=options.basis_dtype,
        basis_orthogonality_tol=1.0,  # the plan assumes no block moves to fp32 bases
        block_size=options.block_size,
        precondition_frequency=options.precondition_frequency,
        split_blocks=options.split_blocks,
    )
    return kwargs


def _groups(model: nn.Module, options: PlanOptions) -> list[dict]:
    return [
        {"params": [p for _, p in named], "stack_dims": dims}
        for dims, named in param_groups(model, options)
    ]


def _split(opt: SOAP) -> dict[str, int]:
    """The real state bytes by kind; with the total that ``state_bytes()`` reports."""
    split = {"moments": 0, "factors": 0, "bases": 0}
    for state in opt.state.values():
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                kinds = {"exp": "moments", "factor": "factors", "basis": "bases"}
                kind = kinds[key.split("_")[0]]
                split[kind] += t.numel() * t.element_size()
    split["soap"] = opt.state_bytes()
    return split


def _planned(rank) -> dict[str, int]:
    return {
        "moments": rank.moments,
        "factors": rank.factors,
        "bases": rank.bases,
        "soap": rank.soap,
    }


def _step_with_grads(model: nn.Module, opt: SOAP) -> None:
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()


CASES = {
    "default": ("mixed", {}),
    "bf16 moments": ("mixed", {"moment_dtype": torch.bfloat16}),
    "one-sided": ("mixed", {"one_sided": True}),
    "small max_precond_dim": ("mixed", {"max_precond_dim": 16}),
    "merge_dims": ("mixed", {"max_precond_dim": 16, "merge_dims": True}),
    "channels_last": ("mixed", {"merge_dims": True, "data_format": "channels_last"}),
    "precondition_1d": ("mixed", {"precondition_1d": True}),
    "expert stack": ("mixed", {"stack_dims": 1}),
    "stack, one-sided, bf16": (
        "mixed",
        {"stack_dims": 1, "one_sided": True, "moment_dtype": torch.bfloat16},
    ),
    "lean": (  # the README's lean set
        "mixed",
        {
            "one_sided": True,
            "moment_dtype": torch.bfloat16,
            "factor_dtype": torch.bfloat16,
            "basis_dtype": torch.bfloat16,
        },
    ),
    "blocks": ("mixed", {"block_size": 7}),
    "blocks, never split": ("mixed", {"block_size": 7, "split_blocks": "never"}),
    # the conv merged to (8, 6, 9): blocks that are no boxes of its own dims take the round trip
    "blocks, merged": ("mixed", {"block_size": 5, "merge_dims": True, "max_precond_dim": 16}),
    "blocks, one-sided, stack": ("mixed", {"block_size": 5, "one_sided": True, "stack_dims": 1}),
    "gpt2-tiny (tied)": ("gpt2-tiny", {}),
    "llama3-tiny": ("llama3-tiny", {}),
    "llama3-tiny one-sided": ("llama3-tiny", {"one_sided": True, "max_precond_dim": 64}),
    "moe-tiny": ("moe-tiny", {"stack_dims": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_single_process_plan_is_the_real_state(case):
    name, kwargs = CASES[case]
    model = _model(name)
    options = PlanOptions(strategy="single", **kwargs)
    planned = plan(model, options)
    opt = SOAP(_groups(model, options), strategy="single", **_soap_kwargs(options))
    _step_with_grads(model, opt)
    assert _planned(planned.ranks[0]) == _split(opt)


def test_fp64_parameters_keep_fp64_state():
    model = _model("mixed", torch.float64)
    options = PlanOptions(strategy="single", moment_dtype=torch.bfloat16)
    opt = SOAP(_groups(model, options), **_soap_kwargs(options))
    _step_with_grads(model, opt)
    assert _planned(plan(model, options).ranks[0]) == _split(opt)
    # the same model planned as bf16 moments on fp32 parameters: half the moment bytes
    as_fp32 = plan(model, PlanOptions(moment_dtype=torch.bfloat16, param_dtype=torch.float32))
    assert as_fp32.ranks[0].moments * 4 == plan(model, options).ranks[0].moments


@pytest.mark.parametrize("dtype_option", ["factor_dtype", "basis_dtype"])
def test_factor_and_basis_storage_dtypes(dtype_option):
    model = _model("mixed")
    options = PlanOptions(strategy="single", **{dtype_option: torch.bfloat16})
    opt = SOAP(_groups(model, options), **_soap_kwargs(options))
    _step_with_grads(model, opt)
    assert _planned(plan(model, options).ranks[0]) == _split(opt)


DISTRIBUTED_CASES = [
    "default",
    "bf16 moments",
    "one-sided",
    "merge_dims",
    "expert stack",
    "lean",
    "blocks",
]


def ddp_state(rank: int, world: int, cases: list[str]) -> list[dict[str, int]]:
    """Per case, this rank's real SOAP state under strategy="ddp"."""
    result = []
    for case in cases:
        name, kwargs = CASES[case]
        model = _model(name)
        options = PlanOptions(strategy="ddp", world=world, **kwargs)
        opt = SOAP(_groups(model, options), strategy="ddp", **_soap_kwargs(options))
        _step_with_grads(model, opt)
        result.append(_split(opt))
    return result


def test_ddp_plan_is_each_ranks_real_state():
    cases = DISTRIBUTED_CASES + ["blocks, never split", "gpt2-tiny (tied)", "moe-tiny"]
    real = run_ranks(ddp_state, 2, cases)
    for i, case in enumerate(cases):
        name, kwargs = CASES[case]
        planned = plan(_model(name), PlanOptions(strategy="ddp", world=2, **kwargs))
        assert [_planned(r) for r in planned.ranks] == [real[r][i] for r in range(2)], case
        assert all(r.soap > 0 for r in planned.ranks)  # the cases do spread over both ranks
        # the two block cases differ: split where allowed, whole where split_blocks="never"
        split = any(p.owner == SPLIT for p in planned.params)
        assert split == (case == "blocks"), case


def fsdp2_state(rank: int, world: int, cases: list[tuple[str, str]]) -> list[dict[str, int]]:
    """Per (strategy, case), this rank's real state on dim-0-sharded DTensor parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    result = []
    for strategy, case in cases:
        name, kwargs = CASES[case]
        model = _model(name)
        for module in model.modules():
            for key, p in list(module.named_parameters(recurse=False)):
                shard = distribute_tensor(p.detach(), mesh, [Shard(0)])
                setattr(module, key, nn.Parameter(shard, requires_grad=p.requires_grad))
        options = PlanOptions(strategy=strategy, world=world, **kwargs)
        opt = SOAP(_groups(model, options), strategy=strategy, **_soap_kwargs(options))
        torch.manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = distribute_tensor(torch.randn(p.shape), mesh, [Shard(0)])
        opt.step()
        sent = opt.comm_stats["last_step_bytes"]
        exchange = sent.get("grad_rows", 0) + sent.get("update_rows", 0)
        result.append({**_split(opt), "split_exchange": exchange})
    return result


def test_fsdp2_plans_are_each_ranks_real_state():
    cases = [
        ("fsdp2", "default"),
        ("fsdp2", "expert stack"),  # 4 experts over 3 ranks: 2, 2 and none, stepped in place
        ("fsdp2", "moe-tiny"),
        ("fsdp2", "lean"),
        ("fsdp2", "blocks"),  # 4 parameters split, all straight to their owners
        ("fsdp2", "blocks, merged"),  # and one of 4 through an assembler
        ("fsdp2", "blocks, never split"),
        ("fsdp2_local", "default"),
        ("fsdp2_local", "stack, one-sided, bf16"),
    ]
    real = run_ranks(fsdp2_state, 3, cases)
    for i, (strategy, case) in enumerate(cases):
        name, kwargs = CASES[case]
        planned = plan(_model(name), PlanOptions(strategy=strategy, world=3, **kwargs))
        expected = [{**_planned(r), "split_exchange": r.split_exchange} for r in planned.ranks]
        assert expected == [real[r][i] for r in range(3)], case
    # the cases can tell: "blocks" splits with no round trip (boxes of the parameters' own
    # dims), "blocks, merged" pays one for its merged conv, never splitting splits nothing
    split_plans = {
        case: plan(_model("mixed"), PlanOptions(strategy="fsdp2", world=3, **CASES[case][1]))
        for case in ("blocks", "blocks, merged", "blocks, never split")
    }
    assert sum(p.owner == SPLIT for p in split_plans["blocks"].params) == 4
    assert all(r.split_exchange == 0 for r in split_plans["blocks"].ranks)
    assert sum(p.owner == SPLIT for p in split_plans["blocks, merged"].params) == 4
    assert all(r.split_exchange > 0 for r in split_plans["blocks, merged"].ranks)
    assert not any(p.owner == SPLIT for p in split_plans["blocks, never split"].params)


def test_adamw_state_per_strategy():
    model = _model("mixed")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # 1442
    for strategy in ("single", "ddp"):
        ranks = plan(model, PlanOptions(strategy=strategy, world=3)).ranks
        assert [r.adamw for r in ranks] == [8 * trainable] * 3
    assert [r.adamw for r in plan(model, PlanOptions(strategy="zero2", world=3)).ranks] == [
        8 * n
        for n in (481, 481, 480)  # one flat buffer, torch.chunk pieces
    ]
    fsdp2 = [r.adamw for r in plan(model, PlanOptions(strategy="fsdp2", world=3)).ranks]
    assert sum(fsdp2) == 8 * trainable and max(fsdp2) > min(fsdp2)  # dim-0 shards, uneven


def _stack_of_four():
    """Four (30, 20) matrices stacked; only their 20-dim is factored (max_precond_dim 25)."""
    return make_block_spec(
        (4, 30, 20),
        max_precond_dim=25,
        merge_dims=False,
        precondition_1d=False,
        data_format="channels_first",
        stack_dims=1,
    )


def test_refresh_flops_model():
    spec = _stack_of_four()
    state = block_state(spec, (4, 4, 4), precondition_frequency=10)
    # per matrix only the 20-dim is factored: GG Q (2 d^3) and a QR with Q formed (8/3 d^3)
    assert state.refresh_flops == pytest.approx(4 * (2 + 8 / 3) * 20**3 / 10)
    assert (state.moments, state.factors, state.bases) == (2 * 2400 * 4, 4 * 400 * 4, 4 * 400 * 4)


def test_adaptive_refresh_flops_bounds():
    spec = _stack_of_four()
    cubes = 4 * 20**3 / 10  # four matrices, their 20-dim factored, one refresh in 10 steps
    plain = block_state(spec, (4, 4, 4), 10)
    assert plain.refresh_flops_fewest == plain.refresh_flops
    adaptive = block_state(spec, (4, 4, 4), 10, max_skipped_refreshes=4)
    # the test reads the refresh's own GG Q: no more without skips; a skip costs GG Q alone,
    # and at most 4 of 5 due refreshes are skipped
    assert adaptive.refresh_flops == pytest.approx(plain.refresh_flops)
    assert adaptive.refresh_flops_fewest == pytest.approx((2 + (8 / 3) / 5) * cubes)


def test_a_skipped_refresh_costs_the_product_alone():
    """What the planner's adaptive bound assumes, counted on the real optimizer: on a due step
    whose refresh is skipped, ``finish_refreshes`` multiplies ``GG Q`` once per factor and
    nothing else (``torch.utils.flop_counter`` counts every matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    from distsoap.engine import update

    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(12, 20))
    opt = SOAP([weight], precondition_frequency=2, refresh_tolerance=1e-12, max_skipped_refreshes=2)
    counted: list[int] = []
    finish = opt.engine.finish_refreshes

    def counted_finish():
        with FlopCounterMode(display=False) as counter:
            finish()
        counted.append(counter.get_total_flops())

    opt.engine.finish_refreshes = counted_finish
    real = update.off_diagonal_mass_of_products
    update.off_diagonal_mass_of_products = lambda f, b, p: torch.zeros(p[0].shape[0])
    try:
        for _ in range(14):
            weight.grad = torch.randn(12, 20)
            opt.step()
    finally:
        update.off_diagonal_mass_of_products = real
    product = 2 * (12**3 + 20**3)  # GG Q of both factors
    due = [flops for flops in counted if flops > 0]  # every second step: 6 of 12 updates
    # every mass reads 0: two skips (the most allowed in a row), then a refresh, which costs more
    assert [flops == product for flops in due] == [True, True, False] * 2
    assert all(flops > product for flops in due[2::3])
    assert opt.state[weight]["skipped_refreshes"] == 4


def test_large_presets_build_on_meta_with_published_sizes():
    counts = {}
    for name in ("gpt2-124m", "llama3-8b", "llama3-70b"):
        model = build_model(name)
        assert all(p.is_meta for p in model.parameters())
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts["gpt2-124m"] == 124_439_808  # tied LM head
    assert counts["llama3-8b"] == 8_030_261_248
    assert counts["llama3-70b"] == 70_553_706_496
    assert math.isclose(counts["llama3-8b"], 8.03e9, rel_tol=1e-3)
    assert math.isclose(counts["llama3-70b"], 70.6e9, rel_tol=1e-3)


def test_cli_prints_the_table():
    command = [sys.executable, "-m", "distsoap.plan", "--model", "gpt2-124m"]
    command += ["--strategy", "fsdp2", "--world", "64"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "gpt2-124m: 124M trainable parameters in 148 tensors; strategy fsdp2, 64 ranks" in out
    for row in ("SOAP state", "moments", "factors", "bases", "AdamW state", "SOAP / AdamW"):
        assert f"\n{row}" in out or f"\n  {row}" in out
    assert "refresh FLOP / step" in out
    assert "fewest (adaptive)" not in out  # only with the adaptive refresh on


def test_cli_shows_the_adaptive_floor(capsys):
    argv = ["--model", "gpt2-tiny", "--strategy", "ddp", "--world", "2"]
    assert main([*argv, "--refresh-tolerance", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "refresh_tolerance=0.05 max_skipped_refreshes=4" in out
    assert "\n  fewest (adaptive)" in out


def test_cli_bad_input_exits_2(capsys):
    command = [sys.executable, "-m", "distsoap.plan", "--model", "gpt5", "--world", "8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown model 'gpt5': give one of gpt2-124m, llama3-8b" in done.stderr
    for argv, message in [
        (["--model", "gpt2-tiny", "--world", "0"], "--world: must be an integer >= 1, got '0'"),
        (["--model", "gpt2-tiny", "--world", "two"], "--world: must be an integer >= 1"),
        (["--model", "gpt2-tiny", "--strategy", "fsdp9"], "invalid choice: 'fsdp9'"),
        (["--model", "gpt2-tiny", "--moment-dtype", "int8"], "--moment-dtype: dtype must be"),
        (["--model", "missing.py"], "model file 'missing.py' does not exist"),
        (["--model", "gpt2-tiny", "--refresh-tolerance", "-1"], "refresh_tolerance must be"),
        (["--model", "gpt2-tiny", "--max-skipped-refreshes", "-1"], "max_skipped_refreshes"),
        (
            ["--model", "gpt2-tiny", "--stack-dims", "2", "--stack-pattern", "wte"],
            "'wte.weight': stack_dims=2",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_model_file_and_json(tmp_path, capsys):
    path = tmp_path / "model.py"
    path.write_text(
        "import torch\n\n"
        "def build_model():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))\n"
    )
    assert main(["--model", str(path), "--strategy", "ddp", "--world", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_parameters"] == 16 * 32 + 32 + 32 * 8 + 8
    assert [p["name"] for p in report["params"]] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert {p["owner"] for p in report["params"]} == {0, 1}
    assert sum(r["soap"] for r in report["ranks"]) == report["summary"]["soap"]["total"]
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(PlanError, match="must define build_model"):
        build_model(str(tmp_path / "empty.py"))
