#!/usr/bin/env bash
# One device session, in stages; logs and JSON under $OUT.
# Usage on the GPU machine (repo root): bash benchmarks/device_run.sh STAGE...
#   gpu     GPU tests only (bf16, fp16; pytest -m gpu, xdist over CPU cores)
#   check   GPU tests (bf16, fp16; pytest -m gpu, xdist over CPU cores) on GPU 0, and meanwhile the
#           training example (NSA vs SDPA) on the last GPU; then the DDP / FSDP2 gradient check
#           when there are two GPUs
#   bench   the paper pattern against SDPA and fla-core: 8k..64k (random and local inputs), 128k / 256k (memory),
#           GQA groups
#   decode  decoding steps against cuDNN over the whole cache
#   tune    `nsa-dsl tune` of the forward kernels at 64k (stored next to the kernel cache)
#   paper   the paper pattern 8k..64k against cuDNN and flash_nsa (the public NSA kernels, carried
#           in .peers: see ../shared/peers/README.md)
#   gqa     GQA groups 16 and 4 at 64k
#   reach   the second release's patterns against cuDNN: DSA (indexer), MoBA and its tiles, encoder
#   paged   decoding, contiguous and paged caches, Python-launched and graph-replayed, against cuDNN
#   cp      context parallelism over a group of one against the plain op (benchmarks/cp_overhead.py)
#   lm      examples/train_code_lm.py: NSA against SDPA on the standard library's source, T = 8192
#   floors  every kernel of a 64k training step against its floor (benchmarks/kernel_floors.py);
#           floors-tma: the same with the compression kernels' TMA loads pinned
#   reduce  fp32 reduce-add rates into L2-resident and HBM buffers (benchmarks/reduce_add.py)
#   ncu     what bounds the selection kernels at 64k: DRAM and L2 bytes, hit rate, throughput (ncu)
set -u
OUT="${OUT:-/tmp/nsa-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NSA_DSL_CACHE_DIR="${NSA_DSL_CACHE_DIR:-/tmp/nsa-cache}"
if ls .whl/*.whl >/dev/null 2>&1; then   # packages the device image lacks (lark, ...), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
# a source tree run without installing: pyproject's package-dir mapping (nsa_dsl.codegen = codegen/, ...) as links
for d in codegen templates examples; do [ -e nsa_dsl/$d ] || ln -s ../$d nsa_dsl/$d; done
S=examples/nsa_paper_mean.nsa
NGPU=$(nvidia-smi -L | wc -l)
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

for stage in "$@"; do
case $stage in
gpu)
  # -v: a line per test as it ends, so a run cut by the time limit still says what passed
  timeout ${GPU_TESTS_S:-420} python3 -m pytest -m gpu -v -p no:cacheprovider $XDIST tests/ > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -15 ;;
check)
  CUDA_VISIBLE_DEVICES=$((NGPU - 1)) timeout 280 python3 examples/train_tiny_lm.py --device cuda --compare \
      --steps 20000 --max-time 65 --log-json "$OUT/tiny_lm.json" > "$OUT/tiny_lm.log" 2>&1 &
  TRAIN=$!
  CUDA_VISIBLE_DEVICES=0 timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider $XDIST tests/ \
      > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -15
  wait $TRAIN; grep -E "accuracy|tokens|step .*0 loss" "$OUT/tiny_lm.log" | tail -14
  if [ "$NGPU" -ge 2 ]; then
    timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node 2 examples/check_distributed.py \
        --device cuda > "$OUT/check_distributed.log" 2>&1
    grep -E "vs single|vs fsdp|PASS|FAIL|Error" "$OUT/check_distributed.log" | tail -6
  fi ;;
bench)
  timeout 330 python3 -m nsa_dsl bench $S --lengths 8192,16384,32768,65536 --workload both --peers cudnn,flash,fla \
      --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>/dev/null | tee "$OUT/bench.log" | head -12
  timeout 120 python3 -m nsa_dsl bench $S --lengths 131072,262144 --peers none \
      --json "$OUT/bench_long.json" 2>/dev/null | tee "$OUT/bench_long.log" | head -6
  timeout 120 python3 -m nsa_dsl bench $S --lengths 65536 --heads 32 --kv-heads 2,4,8 --peers none \
      --json "$OUT/bench_gqa.json" 2>/dev/null | tee "$OUT/bench_gqa.log" | head -7 ;;
decode)
  timeout 240 python3 -m nsa_dsl bench $S --decode --lengths 4096,16384,65536,131072 \
      --json "$OUT/decode.json" --plot "$OUT/decode.png" 2>/dev/null | tee "$OUT/decode.log" | tail -14 ;;
tune)
  # TUNE_ARGS: --backward tunes the backward kernels too (longer)
  timeout ${TUNE_S:-300} python3 -m nsa_dsl tune $S --lengths 65536 ${TUNE_ARGS:---no-backward} 2>&1 | tee "$OUT/tune.log" | tail -12 ;;
paper)
  timeout 150 python3 -m nsa_dsl bench $S --lengths ${PAPER_LENGTHS:-8192,16384,32768,65536} --peers cudnn \
      --json "$OUT/paper.json" --plot "$OUT/paper.png" 2>/dev/null | tee "$OUT/paper.log" | head -12
  # flash_nsa's window calls FlashAttention-2 through the peers' flex stand-in, after importing its
  # extension module: an empty one stands in for that
  mkdir -p /tmp/fa2 && touch /tmp/fa2/flash_attn_2_cuda.py
  [ -d .peers ] && PYTHONPATH="$PWD/.peers:/tmp/fa2:$PYTHONPATH" timeout 100 python3 .peers/flash_nsa_bench.py \
      $(echo ${PAPER_LENGTHS:-8192,16384,32768,65536} | tr , ' ') 2>/dev/null | tee "$OUT/flash_nsa.jsonl" ;;
gqa)
  timeout 60 python3 -m nsa_dsl bench $S --lengths 65536 --heads 32 --kv-heads 2,8 --peers none \
      --json "$OUT/gqa.json" 2>/dev/null | tee "$OUT/gqa.log" | head -7 ;;
reach)
  for f in ${REACH:-dsa moba_tiles moba encoder}; do
    L=16384,65536; [ $f = dsa ] && L=8192,16384,32768,65536
    timeout 90 python3 -m nsa_dsl bench examples/$f.nsa --lengths $L --peers cudnn \
        --json "$OUT/reach_$f.json" 2>/dev/null | tee "$OUT/reach_$f.log" | head -8
  done ;;
paged)
  timeout 150 python3 -m nsa_dsl bench $S --decode --lengths ${DECODE_LENGTHS:-16384,65536} ${DECODE_BATCH:+--batch $DECODE_BATCH} \
      --json "$OUT/paged.json" 2>/dev/null | tee "$OUT/paged.log" | tail -14 ;;
cp)
  timeout 60 python3 benchmarks/cp_overhead.py --lengths 8k,64k --json "$OUT/cp.json" 2>&1 | tee "$OUT/cp.log" | tail -8 ;;
lm)
  timeout 270 python3 examples/train_code_lm.py --device cuda --seq-len 8192 --max-time 60 --quiet \
      --log-json "$OUT/code_lm.json" > "$OUT/code_lm.log" 2>&1; tail -20 "$OUT/code_lm.log" ;;
floors|floors-tma)
  F=${stage/-/_}; [ $stage = floors-tma ] && A=--tma || A=
  timeout ${FLOORS_S:-150} python3 benchmarks/kernel_floors.py --length ${FLOORS_T:-65536} $A --json "$OUT/$F.json" \
      2>&1 | tee "$OUT/$F.log" | head -40 ;;
reduce)
  timeout 60 python3 benchmarks/reduce_add.py --json "$OUT/reduce.json" 2>&1 | tee "$OUT/reduce.log" | tail -9 ;;
ncu)
  # one training step's selection kernels (fwd, dq, dk/dv), profiled once each; clocks left alone
  timeout ${NCU_S:-240} ncu --clock-control none -k regex:select_ -c 3 --csv --metrics \
      gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,lts__t_sector_hit_rate.pct,l1tex__t_bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed \
      python3 benchmarks/kernel_floors.py --length ${FLOORS_T:-65536} --ncu > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  grep -v '^==PROF==' "$OUT/ncu.csv" | head -40; tail -3 "$OUT/ncu.err" ;;
*) echo "unknown stage $stage (gpu, check, bench, decode, tune, paper, gqa, reach, paged, cp, lm, floors, floors-tma, reduce, ncu)"; exit 2 ;;
esac
done
