#!/usr/bin/env bash
# The package's main job: `moe-kernels demo`, which runs every part of the package on this
# machine's device and writes one report (report.md, results.json, plots) into ./demo_out
# (or --out DIR). Extra arguments go to `moe-kernels demo` (--quick, --seed N, --device cpu|cuda).
# Sets up ./.venv on first use (see scripts/_venv.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
"$VENV/bin/moe-kernels" info
"$VENV/bin/moe-kernels" demo "$@"
