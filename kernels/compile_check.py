"""Compile the Triton kernels for a CUDA GPU ahead of time, on a machine without one.

Triton's compiler runs on the host: from a kernel's source, argument types and a target compute
capability it produces Triton IR, PTX and (with the ptxas that ships in the Triton wheel) a
cubin, with no driver involved. This module compiles every variant the optimizer can launch
(each autotune config, each storage dtype, int32 and int64 indexing) for one architecture and
reports what the generated code shows:

- whether it compiled at all (the interpreter the CPU tests use is more lenient than the
  compiler about types and constexprs);
- the integer width of the offset arithmetic (int64 where a bucket needs it);
- whether global loads and stores are 128-bit vectors (what an elementwise kernel needs to
  approach the memory bandwidth);
- the shared memory per program, against the architecture's limit (a config over it fails
  only when the autotuner tries it on the GPU);
- whether fp32 products were lowered to TF32 tensor-core instructions (they must not be);
- registers per thread and stack bytes (register spills) from the cubin (``cuobjdump``, shipped
  with Triton too).

Arguments are typed as the launcher types them for tensors from PyTorch's allocator: pointers
16-byte aligned, sizes divisible by 16 where a transformer's are, unit strides as constants.

Usage (TRITON_INTERPRET must not be set: the interpreter replaces the compiler)::

    python -m distsoap.kernels.compile_check --arch 90
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

# Shared memory one program may use, by compute capability (CUDA programming guide, "Technical
# Specifications per Compute Capability": the opt-in maximum per thread block).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass
class CompiledVariant:
    """What the compiler produced for one kernel variant."""

    kernel: str
    """``rotated_adam`` or ``symmetric_factor``."""
    dtype: str
    """The storage dtype that varies: the moments (rotated Adam) or the gradients (factor)."""
    wide_index: bool
    """Compiled with int64 offsets (``WIDE_INDEX``)."""
    config: str
    """The autotune config: its block sizes, warps and stages."""
    arch: int
    """The target compute capability, e.g. 90 for H100."""
    index_bits: int
    """Width of the widest integer multiply in the offset arithmetic (Triton IR)."""
    vector_loads: bool
    """Whether the PTX reads global memory with 128-bit vector loads."""
    vector_stores: bool
    """Whether the PTX writes global memory with 128-bit vector stores."""
    shared_bytes: int
    """Shared memory per program."""
    shared_limit: int
    """The architecture's limit on shared memory per program."""
    uses_tf32: bool
    """Whether any product was lowered to a TF32 instruction."""
    cubin_bytes: int
    """Size of the machine code ptxas produced (0 would mean no cubin)."""
    registers: int
    """Registers per thread (255 is the most a thread can have)."""
    stack_bytes: int
    """Per-thread stack frame: registers spilled to local memory (slow, off-chip)."""


def _config_name(config) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks},warps={config.num_warps},stages={config.num_stages}"


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """Registers and stack bytes per thread of the one kernel in a cubin."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        tool = triton.knobs.nvidia.cuobjdump.path
        report = subprocess.run(
            [tool, "-res-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    return int(usage.group(1)), int(usage.group(2))


def _facts(compiled, **fields) -> CompiledVariant:
    ttir, ptx = compiled.asm["ttir"], compiled.asm["ptx"]
    registers, stack_bytes = _resource_usage(compiled.asm["cubin"])
    widths = [int(w) for w in re.findall(r"arith\.muli [^\n]*?: (?:tensor<(?:\d+x)+)?i(\d+)", ttir)]
    return CompiledVariant(
        **fields,
        index_bits=max(widths, default=32),
        vector_loads=bool(re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx)),
        vector_stores=bool(re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx)),
        shared_bytes=int(compiled.metadata.shared),
        shared_limit=SHARED_MEMORY_LIMIT.get(fields["arch"], 48 * 1024),
        uses_tf32=bool(re.search(r"tf32", ptx)),
        cubin_bytes=len(compiled.asm["cubin"]),
        registers=registers,
        stack_bytes=stack_bytes,
    )


def _compile(jit_function, signature, constexprs, config, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = jit_function.arg_names
    aligned = {  # what the launcher marks for 16-byte aligned pointers and sizes divisible by 16
        (names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind.startswith("*") or kind in ("i32", "i64")
    }
    source = ASTSource(
        fn=jit_function,
        signature=signature,
        constexprs={**constexprs, **config.kwargs},
        attrs=aligned,
    )
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _real_configs(module) -> list:
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return module._configs()
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


def _every_config(
    jit_kernel, module, signature, constexprs, arch, **fields
) -> list[CompiledVariant]:
    """One kernel variant compiled with each autotune config of ``module``.

    ``fields``: the :class:`CompiledVariant` fields that name the variant (kernel, dtype).
    """
    return [
        _facts(
            _compile(jit_kernel.fn, signature, constexprs, config, arch),
            **fields,
            wide_index=constexprs["WIDE_INDEX"],
            config=_config_name(config),
            arch=arch,
        )
        for config in _real_configs(module)
    ]


def rotated_adam_variants(arch: int) -> list[CompiledVariant]:
    """Compile the rotated-Adam kernel: fp32 / bf16 moments, int32 / int64 offsets, every config."""
    from . import rotated_adam_triton as module

    variants = []
    for moments in ("fp32", "bf16"):
        for wide in (False, True):
            signature = {
                "m_ptr": f"*{moments}",
                "v_ptr": f"*{moments}",
                "g_ptr": "*fp32",
                "out_ptr": "*fp32",
                "scale_ptr": "*fp32",
                "n_elements": "i64" if wide else "i32",
                "row_size": "i32",
                "beta1": "fp32",
                "beta2": "fp32",
                "eps": "fp32",
                "WIDE_INDEX": "constexpr",
                "BLOCK": "constexpr",
            }
            variants += _every_config(
                module._rotated_adam_kernel,
                module,
                signature,
                {"WIDE_INDEX": wide},
                arch,
                kernel="rotated_adam",
                dtype=moments,
            )
    return variants


def symmetric_factor_variants(arch: int) -> list[CompiledVariant]:
    """Compile the one-triangle factor kernel: fp32 / bf16 gradients, both index widths."""
    from . import symmetric_factor_triton as module

    variants = []
    for grads in ("fp32", "bf16"):
        for wide in (False, True):
            signature = {
                "f_ptr": "*fp32",
                "g_ptr": f"*{grads}",
                "d": "i32",
                "r": "i32",
                "stride_fb": "i32",
                "stride_fr": "i32",
                "stride_fc": "constexpr",  # contiguous: the launcher makes a stride of 1 constant
                "stride_gb": "i32",
                "stride_gr": "i32",
                "stride_gc": "constexpr",
                "beta": "fp32",
                "WIDE_INDEX": "constexpr",
                "BLOCK": "constexpr",
                "BLOCK_K": "constexpr",
            }
            constexprs = {"stride_fc": 1, "stride_gc": 1, "WIDE_INDEX": wide}
            variants += _every_config(
                module._symmetric_factor_kernel,
                module,
                signature,
                constexprs,
                arch,
                kernel="symmetric_factor",
                dtype=grads,
            )
    return variants


def compile_all(arch: int) -> list[CompiledVariant]:
    """Every variant of every kernel, compiled for compute capability ``arch``.

    Raises:
        RuntimeError: ``TRITON_INTERPRET=1`` is set (the kernels were built for the interpreter).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces Triton's compiler")
    return rotated_adam_variants(arch) + symmetric_factor_variants(arch)


def main(argv: list[str] | None = None) -> None:
    """Print one JSON line per compiled variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        type=int,
        action="append",
        help="compute capability as an integer, e.g. 80 (A100) or 90 (H100); repeatable",
    )
    args = parser.parse_args(argv)
    for arch in args.arch or [90]:
        for variant in compile_all(arch):
            print(json.dumps(asdict(variant)), flush=True)


if __name__ == "__main__":
    main()
