"""Every Triton kernel variant compiled for A100 and H100 (sm_80, sm_90), with no GPU.

The interpreter tests prove the kernels' arithmetic; this proves the compiler accepts them and
produces the code they were written for. It runs Triton's compiler to cubin in a subprocess
without ``TRITON_INTERPRET`` (the interpreter, once loaded, replaces the compiler in-process).
"""

import json
import os
import subprocess
import sys

import pytest

ARCHS = (80, 90)
CONFIGS_PER_KERNEL = 4  # the autotune lists in kernels/*_triton.py
DTYPES = ("fp32", "bf16")


@pytest.fixture(scope="module")
def variants() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "distsoap.kernels.compile_check"]
    for arch in ARCHS:
        command += ["--arch", str(arch)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_every_variant_compiles_to_machine_code(variants):
    seen = {(v["arch"], v["kernel"], v["dtype"], v["wide_index"], v["config"]) for v in variants}
    expected = len(ARCHS) * 2 * len(DTYPES) * 2 * CONFIGS_PER_KERNEL
    assert len(seen) == len(variants) == expected
    assert all(v["cubin_bytes"] > 0 for v in variants)


def test_int64_offsets_exactly_where_asked(variants):
    for v in variants:
        assert v["index_bits"] == (64 if v["wide_index"] else 32), v


def test_rotated_adam_moves_memory_in_128_bit_vectors(variants):
    # scalar loads would need 4x the memory instructions of a copy kernel: no bandwidth target
    for v in variants:
        if v["kernel"] == "rotated_adam":
            assert v["vector_loads"] and v["vector_stores"], v
        else:
            assert v["vector_loads"], v  # the factor kernel's gradient tiles


def test_shared_memory_fits_every_config(variants):
    # a config over the limit would fail only when the autotuner launches it on the GPU
    for v in variants:
        assert v["shared_bytes"] <= v["shared_limit"], v


def test_fp32_products_stay_fp32(variants):
    # input_precision="ieee": TF32 would round the gradients to 10-bit mantissas
    assert not any(v["uses_tf32"] for v in variants)


def test_refuses_to_run_under_the_interpreter(monkeypatch):
    from distsoap.kernels import compile_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        compile_check.compile_all(90)


def test_rotated_adam_never_spills_registers(variants):
    # a spill is a round trip to local (off-chip) memory per element: bandwidth lost; and at
    # <= 128 registers a thread, 512 threads stay resident per SM (65536 registers) to hide latency
    for v in variants:
        if v["kernel"] == "rotated_adam":
            assert v["stack_bytes"] == 0 and v["registers"] <= 128, v
