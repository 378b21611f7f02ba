#!/usr/bin/env bash
# Everything BENCHMARKS.md leaves pending for a GPU, in one go, on a machine with a CUDA device
# and a CUDA build of torch (kept as it is: nothing is downloaded): the kernel tests compiled
# for real, then each benchmark with its GPU preset. Results go to benchmarks/results/*.json;
# copy the figures into BENCHMARKS.md with the device name printed first.
#   bash benchmarks/gpu.sh              # PYTHON=/path/to/python to pick the interpreter
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
"$py" -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)'
if ! "$py" -c 'import distsoap.kernels' 2>/dev/null; then
  # distsoap.kernels is mapped from kernels/ by setup.py: install in place, without deps
  "$py" -m pip install --quiet --no-deps --no-build-isolation -e "$root"
fi
"$py" -m pytest -q tests/kernels tests/unit/test_hot_path.py
"$py" benchmarks/bench_kernels.py --device cuda
"$py" benchmarks/bench_host.py --device cuda
"$py" benchmarks/bench_step.py --preset gpu
"$py" benchmarks/bench_spike.py --preset gpu
"$py" benchmarks/bench_train.py --preset gpu
# issue 18's lean combination on the CPU timing set's shapes (real gradients, ~1 GB on the device)
"$py" benchmarks/bench_options.py --device cuda --preset cpu --rounds 3 \
  --configs reference,default,lean_b128_tol0.05 --lean-variants 128:0.05 \
  --out benchmarks/results/bench_options_gpu.json
