#!/usr/bin/env bash
# One device call (at most ~9 minutes) that gathers the GPU evidence, in this order, each step with
# its own time cap so that a hang cannot eat the rest:
#   1. the GPU test pass: every `kernel` test (Triton kernels, bf16, CUDA-graph capture);
#   2. `moe-kernels validate` on CUDA;
#   3. the benchmark suite at a reduced shape grid that still covers every goal row of the issues;
#   4. the grouped GEMM tuner for the main shapes, with whatever time is left.
# It runs from the source tree with the machine's own torch and triton (PYTHONPATH=.; the GPU image
# has torch 2.11, Triton 3.6, transformers 5.17, no faiss or liger: what needs them is skipped with
# a printed note). Everything lands in $OUT (default ./gpu_out) as exactly these 8 files:
#   session.log  status line, cap and seconds of every step, device and versions
#   env.json     device, versions, commit, date, mode
#   tests.log    the test pass's output;  tests.xml  its JUnit report
#   validate.log the validate table
#   bench.log    every benchmark's table
#   results.tgz  benchmarks/results/<device>/ (CSV + PNG of each benchmark)
#   tuned.json   the tuned grouped GEMM table (or why there is none)
#
#   usage: bash scripts/gpu_session.sh [--cpu]
# --cpu proves the script on a machine without a GPU: the same steps and the same 8 files, with the
# kernel tests through the Triton interpreter, validate on the CPU and the benchmarks' quick CPU grid
# (the tuner needs CUDA: tuned.json then says so).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu_out}"
BUDGET_S="${SESSION_BUDGET_S:-540}"  # the whole call, all steps together
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
mkdir -p "$OUT"
: > "$OUT/session.log"
: > "$OUT/bench.log"
START=$(date +%s)
STATUS=0

log() { echo "$*" | tee -a "$OUT/session.log"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME CAP LOGFILE CMD...: run CMD under min(CAP, time left - 10 s), its output appended to
# LOGFILE; a timeout or failure is logged and the session goes on with the next step.
step() {
    local name=$1 cap=$2 logfile=$3
    shift 3
    local remaining
    remaining=$(( $(left) - 10 ))
    [ "$cap" -gt "$remaining" ] && cap=$remaining
    if [ "$cap" -le 5 ]; then
        log "== $name: SKIPPED (no time left in the ${BUDGET_S} s budget)"
        return
    fi
    local t0=$(date +%s)
    echo "== $name (cap ${cap} s): $*" >> "$logfile"
    timeout --kill-after=10 "$cap" "$@" >> "$logfile" 2>&1
    local rc=$?
    local secs=$(( $(date +%s) - t0 ))
    case $rc in
        0) log "== $name: ok (${secs} s of ${cap} s)" ;;
        124|137) log "== $name: TIMEOUT after ${cap} s"; STATUS=1 ;;
        *) log "== $name: FAILED with exit $rc (${secs} s)"; STATUS=1 ;;
    esac
}

log "gpu_session: mode=$MODE budget=${BUDGET_S} s out=$OUT"
if [ "$MODE" = gpu ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/session.log"
fi
"$PY" - "$MODE" > "$OUT/env.json" <<'EOF'
import json, platform, subprocess, sys, datetime
import torch
def version(name):
    try:
        return __import__(name).__version__
    except Exception as error:  # a missing optional package is a fact to record
        return f"not installed ({type(error).__name__})"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps({
    "mode": sys.argv[1], "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
    "transformers": version("transformers"), "faiss": version("faiss"), "liger_kernel": version("liger_kernel"),
    "python": platform.python_version(), "commit": commit or "unknown",
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}, indent=1))
EOF
cat "$OUT/env.json" >> "$OUT/session.log"
for missing in faiss liger_kernel hypothesis; do
    "$PY" -c "import $missing" 2>/dev/null || log "note: $missing is not installed here; what needs it is skipped"
done

# 1. the GPU test pass
if [ "$MODE" = gpu ]; then
    step tests 200 "$OUT/tests.log" "$PY" -m pytest -m kernel -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml" tests
else
    step tests 200 "$OUT/tests.log" env TRITON_INTERPRET=1 "$PY" -m pytest -m kernel -q -p no:cacheprovider -rs \
        --junitxml="$OUT/tests.xml" tests/test_routing_kernels.py
fi

# 2. validate on the device
if [ "$MODE" = gpu ]; then
    step validate 60 "$OUT/validate.log" "$PY" -m moe_kernels.cli validate --device cuda
else
    step validate 60 "$OUT/validate.log" "$PY" -m moe_kernels.cli validate --device cpu --tokens 7 --dtype float32
fi

# 3. the benchmarks. GPU: the goal rows of the earlier issues (routing at T <= 512 and 16384 on every
# registry shape; exact-k against softmax_topk; knn_route against softmax_topk; fused experts on
# Qwen3-30B-A3B and OLMoE forward and forward+backward against torch._grouped_mm, HF and liger; HF
# blocks and generation; the per-call overhead; routing replay and what batch-invariant mode costs).
# CPU: each one's quick grid.
if [ "$MODE" = gpu ]; then
    bench() { step "bench $1" "$2" "$OUT/bench.log" "$PY" -m moe_kernels.cli bench --op "$1" "${@:3}"; }
    bench softmax_topk 45 --dtype bfloat16 --tokens 1 64 512 16384
    bench probmoe 35 --tokens 64 4096 16384
    bench knn_route 30 --tokens 1 512 16384
    bench fused_experts 80 --dtype bfloat16 --model Qwen3-30B-A3B --model OLMoE-1B-7B --tokens 1 64 256 4096 16384 \
        --direction fwd --direction fwd+bwd
    bench hf_moe_block 30 --tokens 1 256 4096
    bench hf_generate 25 --quick
    bench op_overhead 15
    bench replay 30
else
    bench() { step "bench $1" "$2" "$OUT/bench.log" "$PY" -m moe_kernels.cli bench --op "$1" --quick --device cpu; }
    for op in softmax_topk probmoe knn_route fused_experts hf_moe_block hf_generate op_overhead replay; do
        bench "$op" 60
    done
fi
tar -czf "$OUT/results.tgz" benchmarks/results 2>/dev/null || tar -czf "$OUT/results.tgz" --files-from /dev/null

# 4. the grouped GEMM tuner (it writes its table after every GEMM, so a cap keeps what it finished)
if [ "$MODE" = gpu ]; then
    step tuner 400 "$OUT/session.log" "$PY" -m benchmarks.tune_grouped_mm --model Qwen3-30B-A3B --rows 512 16384
    found=$(ls moe_kernels/configs/grouped_mm/*.json 2>/dev/null | head -n 1)
    if [ -n "$found" ]; then cp "$found" "$OUT/tuned.json"; else echo '{"skipped": "the tuner finished no GEMM"}' > "$OUT/tuned.json"; fi
else
    log "== tuner: not run (it needs CUDA)"
    echo '{"skipped": "the tuner needs CUDA; this was the --cpu proof run"}' > "$OUT/tuned.json"
fi

# The same 8 files every time: a step that never wrote its file leaves a note in it.
for file in tests.log tests.xml validate.log; do
    [ -s "$OUT/$file" ] || echo "not written: see session.log" > "$OUT/$file"
done
log "gpu_session: done in $(( $(date +%s) - START )) s, status $STATUS"
exit $STATUS
