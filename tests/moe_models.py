"""Tiny mixture-of-experts models of the transformers families that store experts as 3-D parameters.

`build(family)` returns a random-init causal LM (float32, eval mode) small enough for a unit test:
2 layers, hidden 16, 4 experts of which 2 are routed per token. `FAMILIES` lists what is available;
`EXPERT_PARAMETERS[family]` names its expert weights as `LoraConfig.target_parameters` takes them.
"""

from __future__ import annotations

import torch

_COMMON = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**_COMMON, intermediate_size=32, moe_intermediate_size=4,
                                              num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1))


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM
    return GptOssForCausalLM(GptOssConfig(**_COMMON, intermediate_size=4, num_local_experts=4,
                                          num_experts_per_tok=2, layer_types=["full_attention"] * 2))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    return MixtralForCausalLM(MixtralConfig(**_COMMON, intermediate_size=4, num_local_experts=4,
                                            num_experts_per_tok=2))


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**{k: v for k, v in _COMMON.items() if k != "head_dim"},
                                              intermediate_size=32, moe_intermediate_size=4,
                                              shared_expert_intermediate_size=4, num_experts=4,
                                              num_experts_per_tok=2, decoder_sparse_step=1))


def _olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM
    return OlmoeForCausalLM(OlmoeConfig(**{k: v for k, v in _COMMON.items() if k != "head_dim"},
                                        intermediate_size=4, num_experts=4, num_experts_per_tok=2))


def _deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    return DeepseekV3ForCausalLM(DeepseekV3Config(
        **{k: v for k, v in _COMMON.items() if k != "head_dim"}, intermediate_size=32, moe_intermediate_size=4,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8))


BUILDERS = {"qwen3_moe": _qwen3_moe, "gpt_oss": _gpt_oss, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe,
            "olmoe": _olmoe, "deepseek_v3": _deepseek_v3}
FAMILIES = list(BUILDERS)
EXPERT_PARAMETERS = {f: ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] for f in FAMILIES}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random `family` causal LM in float32 and eval mode; expert weights drawn at a visible scale."""
    torch.manual_seed(seed)
    model = BUILDERS[family]().float().eval()
    with torch.no_grad():  # some families leave the 3-D expert weights at zero or uninitialized memory
        for name, p in model.named_parameters():
            if p.dim() == 3 or name.endswith("_proj_bias"):
                p.normal_(0, 0.2)
    return model


def tokens(batch: int = 2, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))
