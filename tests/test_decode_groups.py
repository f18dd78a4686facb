"""Eager decode of sibling linears in one launch (`lorakit.fusion.DECODE_GROUPS`): q/k/v and gate/up of a
Llama-shaped model computed by `_triton.lora_small_group`, made by the first sibling and picked up by the
others, give the per-linear fast path's logits step after step, read the adapters' current values, and step
aside when the siblings' states differ. The kernels run on CPU tensors under TRITON_INTERPRET=1 (a
subprocess: the interpreter is chosen when Triton compiles) and on CUDA, where the launch is also repeated
from a plan after its first call.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from lorakit.kernels import _triton
from models import run_under_interpreter

SCRIPT = textwrap.dedent("""
import copy
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
import lorakit as lk
from lorakit import fusion
from lorakit.kernels import _triton

dev = DEVICE
lk.set_fast_path("on")
counts = {"group": 0, "small": 0}
real_group, real_small = _triton.lora_small_group, _triton.lora_small


def counted(name, fn):
    def call(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)
    return call


_triton.lora_small_group = counted("group", real_group)
_triton.lora_small = counted("small", real_small)
cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
STEPS = 3


def run(model, ids, steps, groups):
    # prefill, then one fixed token per step (the same inputs whatever the logits): the logits of each step
    fusion.DECODE_GROUPS = groups
    cache = DynamicCache()
    with torch.no_grad():
        out = [model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].float()]
        for t in steps:
            out.append(model(input_ids=t, past_key_values=cache, use_cache=True).logits[:, -1].float())
    fusion.DECODE_GROUPS = False
    return torch.stack(out)


def groups_of(model):
    return list({id(layer.siblings): layer.siblings for _, layer in lk.lora_layers(model) if layer.siblings}.values())


for dtype, batch, tol in ((torch.float32, 1, 1e-5), (torch.bfloat16, 3, 2e-2)):
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.to(dev, dtype)
    ids = torch.randint(0, 128, (batch, 5), device=dev)
    steps = [torch.randint(0, 128, (batch, 1), device=dev) for _ in range(STEPS)]
    alone = run(model, ids, steps, False)
    counts.update(group=0, small=0)
    grouped = run(model, ids, steps, True)
    assert (grouped - alone).abs().max() <= tol * alone.abs().max(), (dtype, (grouped - alone).abs().max())
    # the prefill (few rows here) learns which siblings read one tensor, each linear computing alone (bfloat16:
    # `lora_small`; float32 serves one row only); then one launch per group (4 groups: q/k/v and gate/up of 2
    # layers) and one per other linear (o, down) each step; on CUDA a plan repeats the group's launch
    plans = [g._plan for g in groups_of(model)]
    if dev == "cuda":
        assert counts["group"] == 4 and all(p is not None for p in plans), (counts, plans)
    else:
        assert counts["group"] == 4 * STEPS, counts
    # o and down: on CUDA from the per-linear plans the first run made, but for the first step after a prefill
    assert counts["small"] == 4 * (1 if dev == "cuda" else STEPS) + (2 * 7 if dtype != torch.float32 else 0), counts
    assert all(g.hits > 0 and g.misses == 0 for g in groups_of(model))
    again = run(model, ids, steps, True)
    # plans (CUDA) and general launches give the same bits; so does the grouped prefill of the bfloat16 case
    # here, as at these widths each launch, grouped or not, has one K split
    assert torch.equal(again, grouped), dtype

    # a sibling's adapter changed in place: the next grouped call reads its new values
    k = model.model.layers[1].self_attn.k_proj
    with torch.no_grad():
        k.adapters["default"].lora_B.mul_(-4)
    changed_alone = run(model, ids, steps, False)
    changed = run(model, ids, steps, True)
    assert (changed_alone - alone).abs().max() > 10 * tol * alone.abs().max()
    assert (changed - changed_alone).abs().max() <= tol * alone.abs().max(), dtype

    # siblings in different states (one disabled): the group steps aside, each computes alone
    k.disabled = True
    counts.update(group=0)
    off_alone = run(model, ids, steps, False)
    off = run(model, ids, steps, True)
    assert (off - off_alone).abs().max() <= tol * alone.abs().max(), dtype
    # layer 1's q/k/v no more; the bfloat16 prefill (15 rows) is grouped too now that the groups are learned,
    # and on CUDA it and the first step after it each take the general launch (another input shape)
    prefill = dtype != torch.float32
    assert counts["group"] == 3 * ((2 if prefill else 0) if dev == "cuda" else STEPS + prefill), counts
    k.disabled = False

    # a copied model starts without plans, and computes the same
    copied = copy.deepcopy(model)
    assert all(g._plan is None for g in groups_of(copied))
    assert (run(copied, ids, steps, True) - changed).abs().max() <= tol * alone.abs().max()
print("GROUPS-OK")
""")


@pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")
def test_decode_groups_under_interpreter():
    run_under_interpreter(SCRIPT, "GROUPS-OK")


@pytest.mark.skipif(not torch.cuda.is_available() or _triton.triton is None, reason="needs a CUDA GPU and Triton")
def test_decode_groups_on_gpu():
    exec(compile(SCRIPT.replace("DEVICE", '"cuda"'), "decode_groups_gpu_check", "exec"), {})
