#!/usr/bin/env bash
# Issue 12's device check in one command, for a lent H100/H200 (torch + triton installed there):
# the GPU tests (tests/gpu, compiled kernels at the real sizes), then bench/gpu_bench.py.
#
# Prepare here once (the device machine reaches no package index; gguf is the one package missing there):
#     python3 -m pip download --no-deps -d .whl gguf==0.19.0        # .whl/ is git-ignored
# then run it through the device tool with carry [".whl"] and a timeout that leaves room for a rerun:
#     bash bench/gpu_check.sh                                       # logs and JSON land in $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/diffgemma-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
timeout "${GPU_TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu tests/gpu -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout "${GPU_BENCH_TIMEOUT:-360}" python3 bench/gpu_bench.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, gpu bench exit $bench"
exit $(( tests != 0 || bench != 0 ))
