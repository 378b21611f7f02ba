#!/usr/bin/env bash
# The main job: SOAP vs AdamW on the bundled corpus. Sets everything up on first use.
# Extra arguments go to the demo: scripts/demo.sh --steps 100 --out runs/short
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup_env.sh" demo)"
exec "$py" -m distsoap.demo "$@"
