#!/usr/bin/env bash
# Multi-GPU runs for BENCHMARKS.md (DDP / FSDP2 scaling), logs to $OUT.   bash benchmarks/gpu_dist.sh PART
#   PART=ddp   8B shape, DDP, 1 and 2 GPUs at 2 and 8 sequences per GPU
#   PART=fsdp  8B shape, FSDP2, 1 and 2 GPUs; then a 70B-shaped model (80 layers) that one GPU cannot hold
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/lorakit-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
N=${NGPU:-1,2}
case "${1:-ddp}" in
  ddp)
    nvidia-smi topo -m 2>&1 | head -6 | tee "$OUT/topo.txt"
    timeout 250 $PY benchmarks/bench_distributed.py --sweep "$N" --strategy ddp --json "$OUT/ddp_b2.json" 2>&1 | tail -12 | tee "$OUT/ddp_b2.log"
    timeout 250 $PY benchmarks/bench_distributed.py --sweep "$N" --strategy ddp --batch 8 --steps 6 --warmup 2 \
      --json "$OUT/ddp_b8.json" 2>&1 | tail -12 | tee "$OUT/ddp_b8.log" ;;
  fsdp)
    timeout 230 $PY benchmarks/bench_distributed.py --sweep "$N" --strategy fsdp --json "$OUT/fsdp_b2.json" 2>&1 | tail -12 | tee "$OUT/fsdp_b2.log"
    # 70B shape: hidden 8192, 80 layers, GQA 64/8, MLP 28672, vocab 128256 (141 GB of bf16 weights)
    timeout 320 $PY benchmarks/bench_distributed.py --sweep "$N" --strategy fsdp --layers 80 --hidden 8192 \
      --intermediate 28672 --heads 64 --kv-heads 8 --batch 1 --steps 4 --warmup 2 \
      --json "$OUT/fsdp_70b.json" 2>&1 | tail -16 | tee "$OUT/fsdp_70b.log" ;;
esac
