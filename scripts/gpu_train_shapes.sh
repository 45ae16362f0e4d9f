#!/usr/bin/env bash
# Trains shapes base-model candidates side by side on one lent GPU (see scripts/train_shapes_base.py);
# brings back each run's log, final EMA weights and in-range weights as tars under $OUT.
#   bash scripts/gpu_train_shapes.sh MINUTES NAME:"ARGS" [NAME:"ARGS" ...]
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/py
fi
minutes=$1; shift
mkdir -p /tmp/shapes
names=()
for spec in "$@"; do
  name=${spec%%:*}; args=${spec#*:}; names+=("$name")
  # shellcheck disable=SC2086
  python3 scripts/train_shapes_base.py --output-dir "/tmp/shapes/$name" --max-minutes "$minutes" $args \
    >"/tmp/shapes/$name.log" 2>&1 &
done 2>/dev/null
wait
for name in "${names[@]}"; do
  grep -E "^(params|step|done)" "/tmp/shapes/$name.log" | sed "s/^/$name: /"
  cp "/tmp/shapes/$name/train_log.json" "/tmp/shapes/$name.train_log.json" 2>/dev/null
  tar cf "$OUT/$name.final.tar" -C "/tmp/shapes/$name" --exclude in_range . 2>/dev/null
  [ -d "/tmp/shapes/$name/in_range" ] && tar cf "$OUT/$name.in_range.tar" -C "/tmp/shapes/$name/in_range" .
done
tar czf "$OUT/logs.tar.gz" -C /tmp/shapes $(cd /tmp/shapes && ls *.log *.json 2>/dev/null)
ls -la "$OUT"
