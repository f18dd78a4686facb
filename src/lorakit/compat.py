"""Whether vLLM (and SGLang, which follows its rules) will load an adapter folder, checked without loading it.

vLLM's multi-LoRA loading refuses adapters with `modules_to_save`, DoRA (`use_dora`), LoRA on biases, and
ranks above its `--max-lora-rank` (default 16; ranks up to 512 supported); it applies LoRA to the
projections of attention and MLP blocks (and the embedding / output head), not to other modules.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

class VllmWarning(UserWarning):
    """An adapter was saved that vLLM will not load as it is (`save_adapter` warns with the fix); filter with
    `warnings.simplefilter("ignore", lorakit.compat.VllmWarning)`."""


#: vLLM's default --max-lora-rank, and the largest rank it supports
VLLM_DEFAULT_MAX_RANK = 16
VLLM_MAX_RANK = 512

# module names (last path component) that vLLM's decoder models take LoRA on: Llama / Mistral / Qwen / Gemma
# projections, GPT-2 / GPT-NeoX / Falcon / Phi fused ones, embeddings and output heads
VLLM_TARGETS = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "fc1", "fc2",
    "Wqkv", "out_proj", "w1", "w2", "w3", "embed_tokens", "lm_head", "wte",
})


def vllm_problems(adapter_dir: str | os.PathLike) -> list[str]:
    """The ways the adapter in `adapter_dir` breaks vLLM's loading rules, one sentence each with the fix;
    empty when vLLM loads it as is. Reads adapter_config.json and the weights file's tensor names only.
    A folder that is not a readable adapter gives one sentence saying so (loading it reports the details)."""
    folder = Path(adapter_dir)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return [f"{folder / 'adapter_config.json'} cannot be read ({exc}); vLLM will not load this folder."]
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']}: vLLM refuses adapters that save whole "
                        "modules; train without modules_to_save, or merge the adapter (`lorakit merge`) and serve "
                        "the merged model.")
    keys = _tensor_names(folder)
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in keys):
        problems.append("DoRA (use_dora): vLLM refuses DoRA adapters; merge it (`lorakit merge`) and serve the "
                        "merged model, or train plain LoRA.")
    if config.get("bias", "none") not in (None, "none"):
        problems.append(f"bias={config['bias']!r}: vLLM does not load trained biases; train with bias='none'.")
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    ranks = [int(r) for r in ranks if isinstance(r, (int, float)) and not isinstance(r, bool)]
    top = max(ranks, default=0)
    if top > VLLM_MAX_RANK:
        problems.append(f"rank {top} is above {VLLM_MAX_RANK}, the largest rank vLLM supports; train with a "
                        "smaller r.")
    elif top > VLLM_DEFAULT_MAX_RANK:
        problems.append(f"rank {top} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}; start vLLM "
                        f"with --max-lora-rank {_next_power_of_two(top)}.")
    modules = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys if ".lora_" in k})
    if not keys:
        targets = config.get("target_modules")
        modules = sorted(targets) if isinstance(targets, list) else []
    odd = [m for m in modules if m not in VLLM_TARGETS]
    if odd:
        problems.append(f"LoRA on {odd}: vLLM applies LoRA to attention and MLP projections, embeddings and the "
                        "output head only; it will refuse or ignore these modules.")
    return problems


def _tensor_names(folder: Path) -> list[str]:
    """Tensor names in adapter_model.safetensors (its header only); [] when it cannot be read."""
    try:
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            return list(f.keys())
    except Exception:  # a missing or damaged file: loading it reports the problem in full
        return []


def _next_power_of_two(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()
