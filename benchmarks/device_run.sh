#!/usr/bin/env bash
# One device session: GPU correctness tests (bf16, fp16), then the benchmark, logs under $OUT.
# Usage on the device machine (repo root): bash benchmarks/device_run.sh [test-seconds] [bench-lengths]
set -u
OUT="${OUT:-/tmp/nsa-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NSA_DSL_CACHE_DIR=/tmp/nsa-cache
if ls .whl/*.whl >/dev/null 2>&1; then   # packages the device image lacks (lark), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${1:-240}" python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout "${3:-300}" python3 -m nsa_dsl bench examples/nsa_paper_mean.nsa --lengths "${2:-8192,16384,32768,65536}" \
  --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 | tee "$OUT/bench.log" | grep -v "bench:" | tail -20
