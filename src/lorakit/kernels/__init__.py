"""Fast LoRA math: fused autograd Functions (any device) and Triton kernels (CUDA), plus references.

    lora_linear(x, weight, bias, A, B, scale, dropout=0.0, training=False)   one adapted linear
    lora_linear_multi(x, weight, bias, As, Bs, scales, dropouts, training)    several adapters summed
    lora_linear_group(x, weights, biases, As, Bs, scales, dropout, training)  q/k/v-style linears sharing x
    lora_linear_routed(x, weight, bias, As, Bs, scales, rows)                 one adapter per batch row
    reference_lora_linear(...), reference_lora_linear_routed(...)             plain PyTorch, autograd
    mark_recomputable(x, fn, *tensors), recipe_of(x)                          rebuild x in backward

The fast Functions compute exactly the reference's function (tests/test_kernels.py), with
dropout masks defined in `dropout.py` and regenerated in backward rather than stored.
"""

from .dropout import keep_mask, new_seed
from .linear import (LoraLinearFunction, LoraLinearShared, LoraLinearSingle, decode_group, decode_group_plan,
                     decode_plan, lora_linear, lora_linear_group, lora_linear_multi, lora_linears, mark_recomputable,
                     recipe_of, rms_norm_apply)
from .reference import reference_lora_linear, reference_lora_linear_multi, reference_lora_linear_routed
from .routed import lora_linear_routed, stack_adapters

__all__ = [
    "LoraLinearFunction",
    "LoraLinearShared",
    "LoraLinearSingle",
    "keep_mask",
    "lora_linear",
    "lora_linear_group",
    "lora_linear_multi",
    "lora_linear_routed",
    "lora_linears",
    "mark_recomputable",
    "new_seed",
    "reference_lora_linear",
    "reference_lora_linear_multi",
    "reference_lora_linear_routed",
    "recipe_of",
    "rms_norm_apply",
    "stack_adapters",
]
