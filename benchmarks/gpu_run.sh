#!/usr/bin/env bash
# One device call: the kernel tests on the GPU, then every benchmark; logs go to $OUT.
#   bash benchmarks/gpu_run.sh            (from the repository root; PYTHONPATH=src is set here)
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lorakit-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout ${T_TESTS:-100} $PY -m pytest tests/test_kernels.py -q -x -k "not interpreter" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
timeout ${T_LINEAR:-90} $PY benchmarks/bench_linear.py 2>&1 | tee "$OUT/linear.log"
timeout ${T_TRAIN:-240} $PY benchmarks/bench_train.py ${TRAIN_ARGS:-} --json "$OUT/train.json" 2>&1 | tee "$OUT/train.log"
timeout ${T_INFER:-150} $PY benchmarks/bench_infer.py ${INFER_ARGS:-} 2>&1 | tee "$OUT/infer.log"
