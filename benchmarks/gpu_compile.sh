#!/usr/bin/env bash
# One device call: the CUDA fusion tests, bench_train under torch.compile, bench_infer; logs to $OUT.
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lorakit-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
timeout 90 $PY -m pytest tests/test_fusion.py -q -x -k cuda -p no:cacheprovider -W ignore::FutureWarning 2>&1 | tail -3 | tee "$OUT/tests.log"
timeout ${T_COMPILE:-330} $PY benchmarks/bench_train.py --compile --cases ${CASES:-floor,lorakit,lorakit-p0} \
  --json "$OUT/train1b_compile.json" 2>&1 | grep -v Warning | tail -12 | tee "$OUT/train1b_compile.log"
timeout ${T_INFER:-150} $PY benchmarks/bench_infer.py --no-peft --reps 5 2>&1 | tee "$OUT/infer.log"
