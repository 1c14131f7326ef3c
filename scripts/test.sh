#!/usr/bin/env bash
# The whole test suite. Sets up ./.venv on first use (see scripts/_venv.sh).
#   lint:   ruff check and ruff format --check (configuration in pyproject.toml);
#   pass 1: everything that needs no Triton kernel run (references, C++ oracle, torch.library,
#           compile, CLI, benchmarks harness, ahead-of-time GPU compile of every kernel);
#   pass 2: the Triton kernels, on the GPU when there is one, else through the CPU interpreter.
# Extra arguments go to both pytest runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" -m pytest -m "not kernel" "$@"
if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$VENV/bin/python" -m pytest -m kernel "$@"
else
    TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -m kernel "$@"
fi
