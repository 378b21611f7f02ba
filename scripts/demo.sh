#!/usr/bin/env bash
# The main job: SOAP vs AdamW on the bundled corpus, data-parallel under torchrun (2 CPU ranks
# with gloo here; every GPU with NCCL when CUDA is present). Sets everything up on first use.
# Extra arguments go to the demo: scripts/demo.sh --strategy zero2 --steps 100
# DISTSOAP_NPROC overrides the number of processes (1 runs it as a plain single process).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup_env.sh" demo)"
# check the arguments (and --help) once, in one process, before torchrun starts any rank
for arg in "$@"; do
  case "$arg" in -h | --help) exec "$py" -m distsoap.demo --help ;; esac
done
"$py" -m distsoap.demo --check-args "$@"
# OpenMP threads that wait for each other sleep instead of spinning: on a 2-core machine with one
# core busy elsewhere, spinning made a single-process SOAP run 3x slower than on an idle one
# (measured: 19.5 s vs 6.1 s for 30 steps; passive waiting: 12.4 s, and 6.0 s when idle)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
nproc="${DISTSOAP_NPROC:-$("$py" -c 'import torch; print(torch.cuda.device_count() or 2)')}"
if [ "$nproc" = "1" ]; then
  exec "$py" -m distsoap.demo "$@"
fi
# one thread per rank, what torchrun sets by itself (set here, it skips its warning banner)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m distsoap.demo "$@"
