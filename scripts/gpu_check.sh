#!/usr/bin/env bash
# The whole GPU check in one command, for a lent CUDA machine (see docs/gpu.md):
#   bash scripts/gpu_check.sh [stage ...]     stages: build tests bench suite (default: build tests bench)
# Uses the machine's own python3/torch (no venv: such machines have no package index); wheels the
# machine lacks (diffusers and its importlib_metadata) travel in .whl/ and go to /tmp/site.
# Everything it produces goes to $OUT (default ./out): logs, junit XML, and results.tar.gz holding
# bench/results/<gpu-slug>/ to unpack into the repository.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
STAGES=${*:-build tests bench}

log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.log"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$OUT/summary.log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/summary.log"

for stage in $STAGES; do
  case $stage in
  build)
    log "build (sm_90 only, nvcc threads 8)"
    DIFFRL_CUDA=1 DIFFRL_CUDA_ARCHS=90 DIFFRL_NVCC_THREADS=8 MAX_JOBS=16 \
      $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    $PY -m diffrl info 2>&1 | tee -a "$OUT/summary.log"
    ;;
  tests)
    log "GPU tests (-m gpu)"
    timeout 300 $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" -rfE tests >"$OUT/gpu-tests.log" 2>&1
    log "GPU tests rc=$?: $(tail -1 "$OUT/gpu-tests.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | head -30
    ;;
  suite)
    log "whole suite on the GPU machine"
    timeout 400 $PY -m pytest -q -x -p no:cacheprovider -n 8 tests >"$OUT/suite.log" 2>&1
    log "suite rc=$?: $(tail -1 "$OUT/suite.log")"
    ;;
  bench)
    for op in ${BENCH_OPS:-sde_step advantages reward_attention}; do
      log "bench $op"
      timeout ${BENCH_TIMEOUT:-150} $PY -m bench.run --device cuda --ops "$op" ${BENCH_ARGS:-} >"$OUT/bench-$op.log" 2>&1
      log "bench $op rc=$?: $(grep -E 'rows in|failed' "$OUT/bench-$op.log" | tail -1)"
      tar czf "$OUT/results.tar.gz" bench/results  # after each op: a later timeout keeps what finished
    done
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
log done
