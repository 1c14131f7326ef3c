#!/usr/bin/env bash
# The package's main job: validate every op against its references on this machine's device,
# then a short benchmark. Sets up ./.venv on first use (see scripts/_venv.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
"$VENV/bin/moe-kernels" info
"$VENV/bin/moe-kernels" validate
"$VENV/bin/moe-kernels" bench --quick
