#!/usr/bin/env bash
# The test suite (lint, then pytest). Sets everything up on first use.
# Extra arguments go to pytest: scripts/test.sh tests/unit -k reference
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$("$root/scripts/setup_env.sh" dev)"
cd "$root"
"$py" -m ruff check .
# DeepSpeed JIT-builds a CPU communication op on first use (~50 s): keep the build inside the
# workspace so later runs reuse it
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"
# pytest exits 5 when it collects no test; that is a failure here as everywhere else.
exec "$py" -m pytest "$@"
