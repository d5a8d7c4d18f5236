#!/usr/bin/env bash
# The GPU path, measured, in one script: the GPU tests, the trainer's MFU, a run profiled with every
# collector (NVML, CUDA-event phases, allocator history, a kernel window), analyze and report,
# perfkit's own overhead as an A/B with a 95% interval, NCCL across two ranks where two GPUs exist.
# Everything lands under $OUT: summary.json (each stage and the figures), summary.txt, a log a stage.
#
#   on a lent GPU, from a fresh checkout, plotly's wheel in .whl/:   bash bench/gpu_check.sh
#   in CPU mode (CI runs it so, tests/test_gpu_check.py):      GPU_CHECK_MODE=cpu bash bench/gpu_check.sh
#
# The mode is gpu when nvidia-smi sees a GPU, else cpu; the stages are the same, on gpt2-small-gpu or
# tiny-cpu. Each stage has a time limit and the files it must write; a stage that fails does not stop
# the others. Exit 0 when every stage passed.
#
# perfkit is used as installed without building anything (the device has no network for a build
# backend): the installed package layout is made of links into this tree (as `make typecheck` does),
# so tree and install agree, and every stage runs outside the repository, whose own perfkit/ folder
# would otherwise shadow the package. $PYTHON (default python3) must have torch; the device's lacks
# plotly, msgspec and orjson: their wheels in .whl/ go into a folder of their own.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
MODE=${GPU_CHECK_MODE:-$(nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
: >"$OUT/summary.txt"
: >"$OUT/stages.tsv"
say() { echo "$*" | tee -a "$OUT/summary.txt"; }

stage() {  # stage NAME LIMIT_S "FILES IT MUST WRITE" COMMAND...
  local name=$1 limit=$2 expect=$3
  shift 3
  local t0=$SECONDS missing="" status=ok
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  for f in $expect; do [ -s "$f" ] || missing="$missing ${f#"$WORK"/}"; done
  [ "$rc" != 0 ] && status="failed (exit $rc$([ "$rc" = 124 ] && echo ", over ${limit} s"))"
  if [ -n "$missing" ]; then
    [ "$status" = ok ] && status=failed
    status="$status; missing$missing"
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$OUT/stages.tsv"
  say "$name: $status in $((SECONDS - t0)) s"
}

mkdir -p "$WORK/site"
cp -rs "$REPO/perfkit" "$WORK/site/perfkit"
for d in collectors analyzers reports; do cp -rs "$REPO/$d" "$WORK/site/perfkit/$d"; done
if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/deps" "$REPO"/.whl/*.whl \
    >"$OUT/wheels.log" 2>&1 || say "wheels: install failed (wheels.log)"
fi
export PYTHONPATH="$WORK/site:$WORK/deps${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$WORK" || exit 1

if [ "$MODE" = gpu ]; then
  CONFIG=gpt2-small-gpu STEPS=30 GPUS=$(nvidia-smi -L | grep -c '^GPU')
  LIMIT_TESTS=240 LIMIT_RUN=150 LIMIT_OVERHEAD=150 OVERHEAD_STEPS=30 OVERHEAD_REPEATS=3
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/gpu.csv" 2>&1
else
  CONFIG=tiny-cpu STEPS=12 GPUS=0
  LIMIT_TESTS=120 LIMIT_RUN=90 LIMIT_OVERHEAD=120 OVERHEAD_STEPS=12 OVERHEAD_REPEATS=2
fi
say "mode $MODE: config $CONFIG, $GPUS GPU(s), python $("$PY" -c 'import sys; print(sys.version.split()[0])')"

stage environment 60 "$OUT/environment.json" "$PY" -c "
import json, sys, torch, perfkit
from perfkit.envinfo import environment
env = {**environment(), 'perfkit_from': perfkit.__file__, 'torch': torch.__version__, 'cuda': torch.version.cuda,
       'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
assert '$WORK' in perfkit.__file__, f'perfkit imported from {perfkit.__file__}, not the linked layout'
json.dump(env, open('$OUT/environment.json', 'w'), indent=1, default=str)"

# 1. the GPU tests (CUDA-event timing, loss copy, memory stats, allocator history, NVML, NCCL): on a
#    CPU they are collected and skipped, which is what CPU mode checks
stage gpu_tests "$LIMIT_TESTS" "$OUT/gpu_tests.xml" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
  --junitxml "$OUT/gpu_tests.xml" "$REPO/tests/test_gpu.py"

# 2. the trainer's MFU and tokens/s, plain (no collectors)
stage mfu "$LIMIT_RUN" "$OUT/mfu.json" "$PY" "$REPO/bench/trainer.py" --config "$CONFIG" --nproc 1 \
  --set "steps=$STEPS" --json "$OUT/mfu.json"

# 3. profiled with every collector: the allocator history over steps 3-4, a kernel window 5-6
RUN="$WORK/run"
EXPECT="$RUN/manifest.json $RUN/rank0/steps.jsonl $RUN/rank0/trace.json.gz $RUN/rank0/memory.jsonl"
[ "$MODE" = gpu ] && EXPECT="$EXPECT $RUN/rank0/nvml.jsonl $RUN/rank0/memory_snapshot.pickle"
stage profile "$LIMIT_RUN" "$EXPECT" "$PY" -m perfkit profile --nproc 1 --out "$RUN" --profile-steps 5-6 \
  --memory-history 3-4 -- reference --config "$CONFIG" --set "steps=$STEPS"

# 4. analyze and report it
stage analyze 120 "$RUN/analysis.json $RUN/report/index.html" "$PY" -m perfkit analyze "$RUN" --report

# 5. perfkit's own overhead: profiled / plain, interleaved, a 95% interval over the pairs
stage overhead "$LIMIT_OVERHEAD" "$OUT/overhead.json" "$PY" "$REPO/bench/collector_overhead.py" --mode manual \
  --config "$CONFIG" --nproc 1 --steps "$OVERHEAD_STEPS" --repeats "$OVERHEAD_REPEATS" --json "$OUT/overhead.json"

# 6. NCCL (gloo in CPU mode) across two ranks: one GPU a rank, so only where two GPUs exist
if [ "$MODE" = cpu ] || [ "$GPUS" -ge 2 ]; then
  RUN2="$WORK/run2"
  stage two_ranks "$LIMIT_RUN" "$RUN2/rank1/comms.jsonl $RUN2/analysis.json" bash -c \
    "'$PY' -m perfkit profile --nproc 2 --out '$RUN2' --profile-steps none -- reference --config '$CONFIG' \
     --set steps=$STEPS && '$PY' -m perfkit analyze '$RUN2'"
else
  printf 'two_ranks\tskipped: one GPU (two ranks cannot share one under NCCL)\t0\n' >>"$OUT/stages.tsv"
fi

for f in manifest.json analysis.json report/index.html rank0/steps.jsonl rank0/nvml.jsonl rank0/comms.jsonl; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/run_$(echo "$f" | tr / _)"
done
"$PY" "$REPO/bench/gpu_check_summary.py" "$OUT" "$MODE" "$RUN" | tee -a "$OUT/summary.txt"
status=$?
rm -rf "$WORK"
say "done in $SECONDS s"
exit $status
