# Sourced by the other scripts: creates ./.venv on first use and installs what the package needs.
# Idempotent: a stamp records what was installed, so later runs skip straight to the work.
#
# torch: a machine without an NVIDIA GPU gets torch==2.13.0 (on the project machines that is the
# CPU build, installed from local disk; never a multi-GB CUDA build). A GPU machine gets the
# registry's default torch build. Override with MOE_KERNELS_TORCH="torch==X" if needed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    default_torch="torch"
else
    default_torch="torch==2.13.0"
fi
TORCH_SPEC="${MOE_KERNELS_TORCH:-$default_torch}"
REQUIREMENTS=("$TORCH_SPEC" "triton==3.9.0" "numpy" "faiss-cpu" "safetensors" "matplotlib" "pytest" "pytest-benchmark" "ninja"
              "transformers==5.23.0" "liger-kernel==0.8.5" "ruff==0.17.6" "hypothesis==6.155.2"
              "scikit-learn==1.9.1" "numba==0.68.1")
STAMP="$VENV/.moe-kernels-setup"
WANT="${REQUIREMENTS[*]} $(cat "$ROOT/pyproject.toml" | cksum)"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setting up $VENV (first use)" >&2
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
    echo "$WANT" > "$STAMP"
fi
