#!/usr/bin/env bash
# One long run on a lent GPU machine (torch and triton preinstalled there, no network): the whole
# test suite on the GPU (the ahead-of-time compile check included), `validate`, and the full benchmark.
# Everything is logged under $OUT (or ./gpu_out), and the benchmark results are written to
# benchmarks/results/<device>/ and copied there too, so they can be committed afterwards.
#   usage: bash scripts/gpu_session.sh [--quick-bench]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
status=0
run() {  # run a step, log it, remember a failure but carry on with the next step
    echo "== $*" | tee -a "$OUT/session.log"
    "$@" 2>&1 | tee -a "$OUT/session.log"
    local rc=${PIPESTATUS[0]}
    echo "== exit $rc: $*" | tee -a "$OUT/session.log"
    [ "$rc" -eq 0 ] || status=1
}
run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
run python3 -m moe_kernels.cli info
run python3 -m pytest tests -q -p no:cacheprovider --junitxml="$OUT/pytest.xml"
run python3 -m moe_kernels.cli validate
if [ "${1:-}" = "--quick-bench" ]; then
    run python3 -m moe_kernels.cli bench --quick
else
    run python3 -m moe_kernels.cli bench --op softmax_topk --dtype bfloat16 --dtype float32
    run python3 -m moe_kernels.cli bench --op knn_mix --dtype bfloat16
    run python3 -m moe_kernels.cli bench --op knn_route
    run python3 -m moe_kernels.cli bench --op probmoe
    run python3 -m moe_kernels.cli bench --op fused_experts --dtype bfloat16 --routing uniform skewed one_hot
    run python3 -m moe_kernels.cli bench --op knn_retrieval
    run python3 -m moe_kernels.cli bench --op hf_moe_block
    run python3 -m moe_kernels.cli bench --op hf_generate
    run python3 -m moe_kernels.cli bench --op op_overhead
fi
cp -r benchmarks/results "$OUT/results" 2>/dev/null
exit $status
