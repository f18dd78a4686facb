#!/usr/bin/env bash
# One device call for the training and inference fast path: GPU tests, then bench_train (1.1B eager and as
# CUDA graphs, 8B) and bench_infer, logs to $OUT.   bash benchmarks/gpu_session.sh   (from the repository root)
# A step runs unless its time limit is set to 0 (T_TESTS, T_TRAIN1B, T_GRAPHS, T_TRAIN8B, T_INFER; T_GRAPHS8B
# is off unless given a limit).
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lorakit-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"
[ "${T_TESTS:-120}" != 0 ] && timeout ${T_TESTS:-120} $PY -m pytest tests/test_kernels.py tests/test_fusion.py \
  tests/test_fast_path.py tests/test_graphs.py -q -x -k "not interpreter" -p no:cacheprovider -W ignore::FutureWarning 2>&1 | tail -5 | tee "$OUT/tests.log"
[ "${T_TRAIN1B:-200}" != 0 ] && timeout ${T_TRAIN1B:-200} $PY benchmarks/bench_train.py \
  --cases ${CASES_1B:-floor,peft-all,kernels-group-rc,lorakit,lorakit-p0,lorakit-qv,lorakit-unfused} \
  --profile "${PROFILE_1B:-lorakit}" ${ARGS_1B:-} --json "$OUT/train1b.json" 2>&1 | tee "$OUT/train1b.log"
[ "${T_GRAPHS:-0}" != 0 ] && timeout ${T_GRAPHS} $PY benchmarks/bench_train.py --graphs \
  --cases ${CASES_GRAPHS:-floor,lorakit,lorakit-p0,lorakit-qv,peft-all} --profile "${PROFILE_GRAPHS:-}" ${ARGS_GRAPHS:-} \
  --json "$OUT/graphs1b.json" 2>&1 | tee "$OUT/graphs1b.log"
[ "${T_TRAIN8B:-150}" != 0 ] && timeout ${T_TRAIN8B:-150} $PY benchmarks/bench_train.py --shape 8b \
  --cases ${CASES_8B:-floor,lorakit} --steps 6 --warmup 2 ${ARGS_8B:-} \
  --profile "${PROFILE_8B:-floor,lorakit}" --json "$OUT/train8b.json" 2>&1 | tee "$OUT/train8b.log"
[ "${T_GRAPHS8B:-0}" != 0 ] && timeout ${T_GRAPHS8B} $PY benchmarks/bench_train.py --shape 8b --graphs --attn causal \
  --cases ${CASES_GRAPHS8B:-floor,lorakit} --steps 6 --warmup 2 --json "$OUT/graphs8b.json" 2>&1 | tee "$OUT/graphs8b.log"
[ "${T_INFER:-110}" != 0 ] && timeout ${T_INFER:-110} $PY benchmarks/bench_infer.py ${INFER_ARGS:---no-peft} 2>&1 | tee "$OUT/infer.log"
exit 0
