#!/usr/bin/env bash
# One device call for the training and inference fast path: GPU tests, then bench_train (1.1B and 8B
# shapes) and bench_infer, logs to $OUT.   bash benchmarks/gpu_session.sh   (from the repository root)
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lorakit-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout ${T_TESTS:-120} $PY -m pytest tests/test_kernels.py tests/test_fusion.py tests/test_fast_path.py -q -x \
  -k "not interpreter" -p no:cacheprovider -W ignore::FutureWarning 2>&1 | tail -5 | tee "$OUT/tests.log"
timeout ${T_TRAIN1B:-200} $PY benchmarks/bench_train.py --cases ${CASES_1B:-floor,peft-all,kernels-group-rc,lorakit,lorakit-p0,lorakit-qv,lorakit-unfused} \
  --profile ${PROFILE_1B:-lorakit} --json "$OUT/train1b.json" 2>&1 | tee "$OUT/train1b.log"
timeout ${T_TRAIN8B:-150} $PY benchmarks/bench_train.py --shape 8b --cases ${CASES_8B:-floor,lorakit} --steps 6 --warmup 2 \
  --profile ${PROFILE_8B:-floor,lorakit} --json "$OUT/train8b.json" 2>&1 | tee "$OUT/train8b.log"
timeout ${T_INFER:-110} $PY benchmarks/bench_infer.py --no-peft 2>&1 | tee "$OUT/infer.log"
