"""Triton kernels of the fast path (CUDA, or CPU tensors under TRITON_INTERPRET=1), by family:

    launch.py   the optional Triton import, `available_for`, and the launcher shared by all kernels
    dropout.py  seeded dropout, the mask regenerated in registers from the seed
    train.py    the dropout-fused LoRA input kernels (shrink, backward), the LoRA weight gradients,
                the forward GEMM with the LoRA product in its K loop, the normalization apply step
    decode.py   inference with few rows: the fused one-launch kernel and its `SmallPlan`
    routed.py   per-example adapters (SGMV / BGMV style)

Every wrapper takes 2-D row-major tensors and returns new tensors or writes in place where
its docstring says so. Callers check that Triton applies (`available_for`).
"""

from . import decode
from .decode import SmallPlan, compiled_counters, lora_small, small_plan
from .dropout import dropout_apply, keep_mask
from .launch import ENABLED, available_for, interpreting, triton
from .routed import routed_mm, routed_outer, routed_small, routed_small_ok
from .train import (dropout_backward, expand_gemm, expand_gemm_ok, lora_grads, lora_grads_group, norm_apply,
                    rebuild_source, shrink)

__all__ = ["ENABLED", "decode", "SmallPlan", "available_for", "compiled_counters", "dropout_apply",
           "dropout_backward", "expand_gemm", "expand_gemm_ok", "interpreting", "keep_mask", "lora_grads",
           "lora_grads_group", "lora_small", "norm_apply", "rebuild_source", "routed_mm", "routed_outer",
           "routed_small", "routed_small_ok", "shrink", "small_plan", "triton"]
