"""Kernels-only LoRA modules for the benchmarks: nn.Linear -> a module that calls `lorakit.kernels`.

Not lorakit's layers (those live in src/lorakit/layers.py): a minimal stand-in that lets the
benchmarks measure the fused Functions inside a real model, labelled "kernels only" in tables.

    apply_kernel_lora(model, r=16, alpha=32, dropout=0.05, targets=ALL_LINEAR, group=False)

group=True makes linears that read the same input (q/k/v, gate/up) one `lora_linear_group`
call: the first member called computes every member's output and the others pick theirs up.

recompute=True also patches the Llama RMSNorms and MLPs to mark their outputs with how to
rebuild them (`mark_recomputable`) from tensors their own backward keeps anyway, so the LoRA
Functions do not keep the q/k/v/gate/up input or the down_proj input alive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lorakit.kernels import lora_linear, lora_linear_group, recipe_of

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class KernelLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        out_f, in_f = self.weight.shape
        dev, dt = self.weight.device, self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # Small random B rather than PEFT's zeros: timings on zeros can flatter a GEMM.
        self.lora_B = nn.Parameter(torch.randn(out_f, r, device=dev, dtype=dt) * 1e-3)
        self.scale = alpha / r
        self.p = dropout
        self.group: _Group | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.group is not None:
            return self.group.output(self, x)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale, self.p, self.training,
                           recompute=recipe_of(x))


class _Group:
    """Members read the same x; one fused call makes all their outputs."""

    def __init__(self, members: list[KernelLoraLinear]) -> None:
        self.members = members
        self.x: Tensor | None = None
        self.outs: dict[int, Tensor] = {}

    def output(self, m: KernelLoraLinear, x: Tensor) -> Tensor:
        i = self.members.index(m)
        if self.x is not x or i not in self.outs:
            ms = self.members
            ys = lora_linear_group(x, [k.weight for k in ms], [k.bias for k in ms], [k.lora_A for k in ms],
                                   [k.lora_B for k in ms], [k.scale for k in ms], ms[0].p, ms[0].training,
                                   recompute=recipe_of(x))
            self.x, self.outs = x, dict(enumerate(ys))
        y = self.outs.pop(i)
        if not self.outs:
            self.x = None
        return y


def patch_llama_recompute(model: nn.Module) -> None:
    # The same producers lk.inject installs (lorakit.fusion): RMSNorm and MLP outputs marked rebuildable.
    from lorakit.fusion import install_producers

    install_producers(model)


def apply_kernel_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05,
                      targets=ALL_LINEAR, group: bool = False, recompute: bool = False) -> nn.Module:
    """Freeze `model` and swap every nn.Linear named in `targets` for a KernelLoraLinear, in place."""
    if recompute:
        patch_llama_recompute(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.modules()):
        made = {}
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                made[name] = KernelLoraLinear(child, r, alpha, dropout)
                setattr(parent, name, made[name])
        if group:
            for names in GROUPS:
                if all(n in made for n in names):
                    g = _Group([made[n] for n in names])
                    for n in names:
                        made[n].group = g
    return model
