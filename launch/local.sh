#!/usr/bin/env bash
# One machine, every GPU (or 2 CPU processes with gloo when there is none), torchrun --standalone.
#
#   launch/local.sh -m distsoap.demo --strategy fsdp2      # a module
#   launch/local.sh train.py --lr 3e-3                      # a script
#
# Environment (defaults in brackets):
#   NPROC      processes [GPUs on this machine, else 2]
#   PYTHON     interpreter that has torch and distsoap [python3]
#   DRY_RUN=1  print the command instead of running it
set -euo pipefail
python="${PYTHON:-python3}"
if [ -z "${NPROC:-}" ]; then
  NPROC="$("$python" -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
command=("$python" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@")
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "${command[*]}"
  exit 0
fi
exec "${command[@]}"
