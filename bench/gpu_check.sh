#!/usr/bin/env bash
# One GPU, one script, under 8 minutes: the GPU tests, the trainer's MFU (gpt2-small-gpu), a run
# profiled with every collector (NVML, CUDA events, allocator history), perfkit's own overhead,
# analyze and report; everything lands under $OUT (summary.txt first).
#
#   on a lent device, from the repo root, with plotly's wheel carried in .whl/ (see the device
#   tool's README):   bash bench/gpu_check.sh
#
# Each step has its own time limit and failure does not stop the others: summary.txt says which
# passed. The machine's python3 has torch with CUDA, pynvml, pandas, jinja2 and click; plotly,
# msgspec and orjson come from .whl/ when missing.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME LIMIT_S COMMAND...: run it, log to $OUT/NAME.log, note the result
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  say "$name: $([ $rc = 0 ] && echo ok || echo "FAILED (rc $rc)") in $((SECONDS - t0)) s"
  return $rc
}
export PYTHONUNBUFFERED=1

# perfkit and what the machine lacks, installed apart from the system's packages
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/perfkit . >"$OUT/install.log" 2>&1 \
  || say "install: FAILED (see install.log)"
export PYTHONPATH=/tmp/perfkit:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/perfkit/bin:$PATH
PK="python3 -m perfkit"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/gpu.csv" 2>&1
say "gpu: $(tail -n 1 "$OUT/gpu.csv")"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$SUMMARY"

# 1. the GPU tests (CUDA-event timing, loss copy, memory stats, allocator history, NVML, NCCL trainer)
step gpu_tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs
tail -n 3 "$OUT/gpu_tests.log" >>"$SUMMARY"

# 2. the trainer's MFU, plain (no collectors)
step mfu 75 python3 bench/trainer.py --config gpt2-small-gpu --nproc 1 --set steps=30 --json "$OUT/mfu.json"
grep -E "tok/s|MFU" "$OUT/mfu.log" | tail -n 2 >>"$SUMMARY"

# 3. profiled with every collector, the allocator history over steps 3-4, a kernel window 5-6
rm -rf /tmp/gpu_run
step profile 105 $PK profile --nproc 1 --out /tmp/gpu_run --profile-steps 5-6 --memory-history 3-4 \
  -- reference --config gpt2-small-gpu --set steps=20
step analyze 60 $PK analyze /tmp/gpu_run --report
sed -n '1,40p' "$OUT/analyze.log" >>"$SUMMARY"
for f in manifest.json analysis.json report/index.html rank0/steps.jsonl rank0/nvml.jsonl rank0/comms.jsonl; do
  [ -f "/tmp/gpu_run/$f" ] && cp "/tmp/gpu_run/$f" "$OUT/run_$(echo "$f" | tr / _)"
done
[ -f /tmp/gpu_run/rank0/memory_snapshot.pickle ] && say "allocator history: $(du -h /tmp/gpu_run/rank0/memory_snapshot.pickle | cut -f1)"

# 4. perfkit's own overhead: profiled / plain, interleaved
step overhead 110 python3 bench/collector_overhead.py --mode manual --config gpt2-small-gpu --nproc 1 --steps 30 --repeats 2 \
  --json "$OUT/overhead.json"
tail -n 4 "$OUT/overhead.log" >>"$SUMMARY"
say "done in $SECONDS s"
