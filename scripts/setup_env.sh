#!/usr/bin/env bash
# Set up the Python environment distsoap's commands run in; prints the interpreter's path.
#
#   scripts/setup_env.sh [EXTRAS]      e.g. "dev" (tests) or "demo"
#
# Creates a virtual environment (DISTSOAP_VENV, default .venv) unless one exists. If the
# interpreter that creates it already has torch (a cluster's CUDA build, say), the venv sees it
# and keeps it; otherwise torch==$DISTSOAP_TORCH_VERSION (default 2.13.0) is installed first, so
# that `pip install -e .` finds torch already satisfied. Re-runs skip work already done.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-dev}"
venv="${DISTSOAP_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import torch" >/dev/null 2>&1; then
    "$python" -m venv --system-site-packages "$venv" >&2
  else
    "$python" -m venv "$venv" >&2
  fi
fi
py="$venv/bin/python"
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch ${DISTSOAP_TORCH_VERSION:-2.13.0}" >&2
  "$py" -m pip install -q "torch==${DISTSOAP_TORCH_VERSION:-2.13.0}" >&2
fi
stamp="$venv/.distsoap-${extras//,/-}-$(cat "$root/setup.py" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing distsoap[$extras]" >&2
  # DeepSpeed (dev, deepspeed extras): no ahead-of-time op builds; it JIT-builds what it uses
  DS_BUILD_OPS=0 "$py" -m pip install -q -e "${root}[${extras}]" >&2
  if [[ ",$extras," == *",dev,"* ]]; then
    # torchtitan's optimizer container, for the tests of distsoap.integrations.torchtitan. Its
    # own requirements (datasets, wandb, tensorboard, torchdata: its data and logging) are left
    # out; the container needs tyro and spmd_types only
    "$py" -m pip install -q --no-deps "torchtitan==0.3.0" "spmd_types==0.2.3" >&2
    "$py" -m pip install -q "tyro>=0.8" >&2
  fi
  touch "$stamp"
fi
echo "$py"
