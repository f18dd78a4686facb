"""transformers' Trainer and TRL's trainers on an `lk.inject`-ed model, with no subclass and no extra argument:
checkpoints and save_model hold the adapter in PEFT's format and never the base, resuming ends at the adapter of
an uninterrupted run, load_best_model_at_end and gradient checkpointing work, and mistakes stop before a step."""

from __future__ import annotations

import copy
import json
import logging
import warnings

import pytest
import torch

import lorakit as lk
from lorakit.errors import StateError
from models import make

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = dict(r=4, alpha=8, targets=["q_proj", "v_proj"])


class Tokens(torch.utils.data.Dataset):
    """`n` random sequences of 12 tokens of the tiny Llama's vocabulary (96), labels = inputs."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 96, (n, 12), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _adapted(seed: int = 0):
    model = make("llama", seed).train()
    torch.manual_seed(seed + 1)
    return lk.inject(model, lk.LoraConfig(**CFG))


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=6, save_steps=3,
                logging_steps=100, report_to=[], use_cpu=True, seed=7, data_seed=7, lr_scheduler_type="linear",
                warmup_steps=1, disable_tqdm=True, save_only_model=False)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _train(model, out, resume=None, **kw):
    trainer = transformers.Trainer(model=model, args=_args(out, **kw), train_dataset=Tokens(10, 0),
                                   eval_dataset=Tokens(4, 1))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _adapter(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." in k}


def _files(path):
    return sorted(p.name for p in path.iterdir())


def test_checkpoints_and_save_model_hold_the_adapter_in_peft_format_not_the_base(tmp_path):
    model = _adapted()
    trainer = _train(model, tmp_path / "run")
    trainer.save_model(str(tmp_path / "final"))
    x = torch.randint(0, 96, (2, 9))
    model.eval()
    for folder in (tmp_path / "run" / "checkpoint-6", tmp_path / "final"):
        names = _files(folder)
        assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= set(names), names
        assert "config.json" not in names
        from safetensors.torch import load_file
        kept = load_file(str(folder / "model.safetensors"))
        assert set(kept) == {k for k, p in model.named_parameters() if p.requires_grad}  # no base weight
        assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
        fresh = lk.load_adapter(make("llama").eval(), folder)  # lorakit reads it onto a fresh base
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(make("llama").eval(), str(folder))  # and so does PEFT
        torch.testing.assert_close(theirs(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_from_pretrained_on_a_checkpoint_gives_the_base_with_the_adapter(tmp_path):
    make("llama").save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").train()
    lk.inject(model, lk.LoraConfig(**CFG))
    _train(model, tmp_path / "run", max_steps=3)
    x = torch.randint(0, 96, (2, 9))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-3").eval()
    assert loaded._hf_peft_config_loaded  # transformers went to the base named in adapter_config.json
    torch.testing.assert_close(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_resume_from_checkpoint_ends_at_the_adapter_of_an_uninterrupted_run(tmp_path, caplog):
    whole = _adapted()
    _train(whole, tmp_path / "whole")
    resumed = _adapted()
    assert any(not torch.equal(a, b) for a, b in zip(_adapter(resumed).values(), _adapter(whole).values()))
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        trainer = _train(resumed, tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-3"))
    assert "missing keys" not in caplog.text  # the frozen base is not reported as missing
    assert trainer.state.global_step == 6
    ours, theirs = _adapter(resumed), _adapter(whole)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    model = _adapted()
    # "best" is the highest eval loss, so the best checkpoint is an early one, not the last step
    trainer = _train(model, tmp_path / "run", eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                     metric_for_best_model="eval_loss", greater_is_better=True)
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-3"), best
    from safetensors.torch import load_file
    saved = load_file(f"{best}/model.safetensors")
    for key, value in _adapter(model).items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    last = load_file(str(tmp_path / "run" / "checkpoint-6" / "model.safetensors"))
    assert any(not torch.equal(saved[k], last[k]) for k in saved)


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    plain, checkpointed = _adapted(), _adapted()
    _train(plain, tmp_path / "a", max_steps=3)
    _train(checkpointed, tmp_path / "b", max_steps=3, activation_checkpointing=True)
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    for a, b in zip(_adapter(plain).values(), _adapter(checkpointed).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(_adapter(plain).values(), _adapter(_adapted()).values()))


def test_eject_takes_back_what_inject_attached(tmp_path):
    model = make("llama")
    hooks_before = len(model._load_state_dict_post_hooks), len(model.model.embed_tokens._forward_pre_hooks)
    lk.inject(model, lk.LoraConfig(**CFG))
    assert "save_pretrained" in model.__dict__
    twin = copy.deepcopy(model)
    assert twin.save_pretrained.__self__ is twin
    lk.eject(model, merge=False)
    assert "save_pretrained" not in model.__dict__
    assert (len(model._load_state_dict_post_hooks), len(model.model.embed_tokens._forward_pre_hooks)) == hooks_before
    model.save_pretrained(tmp_path / "plain")  # transformers' own again: the whole model
    assert (tmp_path / "plain" / "config.json").exists() and not (tmp_path / "plain" / "adapter_config.json").exists()
    twin.save_pretrained(tmp_path / "twin")  # the copy kept its own hooks
    assert (tmp_path / "twin" / "adapter_config.json").exists()


# -- mistakes stop before the first step -----------------------------------------------------------------
def _refused(model, out, *words):
    trainer = transformers.Trainer(model=model, args=_args(out), train_dataset=Tokens(10, 0))
    with pytest.raises(StateError) as info:
        trainer.train()
    assert trainer.state.global_step == 0 and not any(out.glob("checkpoint-*"))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_an_adapter_with_nothing_trainable_is_refused_before_a_step(tmp_path):
    model = _adapted()
    for p in model.parameters():
        p.requires_grad_(False)
    _refused(model, tmp_path / "run", "Nothing in LlamaForCausalLM trains", "requires_grad", "q_proj")


def test_a_model_whose_adapters_were_all_deleted_is_refused_before_a_step(tmp_path):
    model = _adapted()
    lk.delete_adapter(model, "default")
    _refused(model, tmp_path / "run", "no lorakit adapter", "lk.inject", "lk.eject")


def test_peft_adapters_beside_lorakits_are_refused_before_a_step(tmp_path):
    model = _adapted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["k_proj"]))
    _refused(wrapped, tmp_path / "run", "PEFT", "get_peft_model", "lk.eject")


def test_a_plain_model_is_an_ordinary_full_fine_tune(tmp_path):
    model = make("llama").train()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _train(model, tmp_path / "run", max_steps=1, warmup_steps=0)
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
    assert (tmp_path / "run" / "checkpoint-1" / "config.json").exists()


def test_torch_compile_trains_the_same_adapter_and_saves_it(tmp_path):
    # the "eager" backend runs Dynamo's tracing of lorakit's layers and hooks without compiling kernels (slow on a
    # small CPU); inductor's kernels are for the GPU benchmark
    plain, compiled = _adapted(), _adapted()
    _train(plain, tmp_path / "a", max_steps=1, save_steps=1)
    trainer = _train(compiled, tmp_path / "b", max_steps=1, save_steps=1, torch_compile=True,
                     torch_compile_backend="eager")
    assert trainer.model_wrapped is not compiled  # Trainer trained through the compiled module
    for a, b in zip(_adapter(plain).values(), _adapter(compiled).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert "adapter_model.safetensors" in _files(tmp_path / "b" / "checkpoint-1")


# -- TRL --------------------------------------------------------------------------------------------------
def _chat_tokenizer(path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    return tok


def _trl_args(config_class, out, **kw):
    return config_class(output_dir=str(out), per_device_train_batch_size=2, max_steps=3, save_steps=3, logging_steps=1,
                        learning_rate=5e-2, report_to=[], use_cpu=True, disable_tqdm=True, max_length=32, **kw)


def _check_checkpoint(model, folder, base_dir):
    from safetensors.torch import load_file
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(_files(folder))
    assert set(load_file(str(folder / "model.safetensors"))) == {k for k, p in model.named_parameters()
                                                                 if p.requires_grad}
    # TRL's configs train under bf16 autocast where the host has it, so the adapters are compared, not logits
    fresh = lk.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(base_dir), folder)
    ours, theirs = _adapter(fresh), _adapter(model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_trl_sft_trainer_saves_the_adapter(tiny_model, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    lk.inject(model, lk.LoraConfig(**CFG))
    chats = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
             for w in ["red", "green", "blue", "cat"] * 2]
    trainer = trl.SFTTrainer(model=model, args=_trl_args(trl.SFTConfig, tmp_path / "run"),
                             train_dataset=datasets.Dataset.from_list(chats),
                             processing_class=_chat_tokenizer(tiny_model))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    _check_checkpoint(model, tmp_path / "run" / "checkpoint-3", tiny_model)


def test_reference_model_is_the_base_and_shares_the_weights():
    model = _adapted().eval()
    base = make("llama").eval()
    from models import randomize
    randomize(model, std=0.2)
    x = torch.randint(0, 96, (2, 9))
    ref = lk.hf.reference_model(model)
    assert list(ref.parameters()) == []  # nothing to move, prepare or copy: the weights are the model's
    torch.testing.assert_close(ref(input_ids=x).logits, base(input_ids=x).logits, rtol=0, atol=0)
    hidden = ref.base_model(input_ids=x).last_hidden_state
    torch.testing.assert_close(hidden, base.model(input_ids=x).last_hidden_state, rtol=0, atol=0)
    assert not torch.allclose(model(input_ids=x).logits, base(input_ids=x).logits)  # the adapters act outside it
    lk.merge(model)
    with pytest.raises(StateError, match="unmerge"):
        lk.hf.reference_model(model)


def test_trl_dpo_trainer_with_lorakits_reference_saves_the_adapter(tiny_model, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model)
    lk.inject(model, lk.LoraConfig(**CFG))
    words = ["red", "green", "blue", "cat"]
    pairs = [{"prompt": f"Say {w}:", "chosen": f" {w}", "rejected": f" {v}"} for w, v in zip(words, words[::-1])] * 2
    trainer = trl.DPOTrainer(model=model, ref_model=lk.hf.reference_model(model),
                             args=_trl_args(trl.DPOConfig, tmp_path / "run"),
                             train_dataset=datasets.Dataset.from_list(pairs),
                             processing_class=_chat_tokenizer(tiny_model))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    # step 1: the policy is the base (B = 0), so the reference agrees; later the adapter moves and the reference
    # stays the base, so the rewards grow away from zero (a reference that followed the policy keeps them at 0)
    assert logs[0]["rewards/margins"] == 0 and abs(logs[0]["loss"] - 0.6931) < 1e-3
    assert logs[-1]["rewards/margins"] > 0
    _check_checkpoint(model, tmp_path / "run" / "checkpoint-3", tiny_model)


def test_readme_section_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## With Hugging Face Trainer or TRL\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    for code in blocks:  # as tests/test_readme.py runs them: each block on its own
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


# -- Liger-style kernels: norms and MLPs of other classes ------------------------------------------------------
class StandInRMSNorm(torch.nn.Module):
    """What Liger's LigerRMSNorm is to lorakit: Llama's RMSNorm math and attributes under another class name."""

    def __init__(self, hidden_size, eps=1e-6, **kwargs):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(v + self.variance_epsilon)).to(x.dtype)


def _stand_in_mlp_forward(self, x):  # Liger's SwiGLU: the same function, run by another forward
    return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _outputs_and_grads(model, x):
    model.train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("how", ["classes", "instances"])
def test_fuse_with_norms_and_mlps_replaced_as_liger_does_computes_the_same(how, monkeypatch):
    # Liger patches transformers' Llama classes (apply_liger_kernel_to_llama: the module's LlamaRMSNorm becomes
    # LigerRMSNorm), or, under Trainer(use_liger_kernel=True), the forwards of a built model's modules
    from transformers.models.llama import modeling_llama
    if how == "classes":
        monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", StandInRMSNorm)
    model = make("llama")
    if how == "instances":
        for module in model.modules():
            if type(module).__name__ == "LlamaMLP":
                module.forward = _stand_in_mlp_forward.__get__(module)
    torch.manual_seed(1)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    from models import randomize
    randomize(model, std=0.1)
    x = torch.randint(0, 96, (2, 10))
    reference = _outputs_and_grads(model, x)
    lk.set_fast_path("on", triton=False)  # the fused Functions and the producers' rebuilt inputs, on the CPU
    try:
        handle = lk.fuse(model)
        fused = _outputs_and_grads(model, x)
    finally:
        lk.set_fast_path("auto", triton=True)
    report = handle.report()
    if how == "instances":  # a forward of the user's (or Liger's) own is kept, and the report says so
        assert "has an instance forward of its own" in report and "producer model.layers.0.mlp" not in report
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-5)
    assert fused[1].keys() == reference[1].keys()
    for name in reference[1]:
        torch.testing.assert_close(fused[1][name], reference[1][name], rtol=1e-4, atol=1e-5)
    handle.undo()


def test_a_quantized_base_trains_under_trainer_and_saves_only_the_adapter(tmp_path):
    pytest.importorskip("bitsandbytes")
    make("llama").save_pretrained(tmp_path / "base")
    nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=nf4, device_map="cpu")
    lk.inject(model, lk.LoraConfig(**CFG))  # transformers refuses to train "purely quantized models" without its mark
    before = _adapter(model)
    _train(model, tmp_path / "run", max_steps=2, save_steps=2, warmup_steps=0)
    assert any(not torch.equal(a, b) for a, b in zip(before.values(), _adapter(model).values()))
    folder = tmp_path / "run" / "checkpoint-2"
    assert sum(f.stat().st_size for f in folder.glob("*.safetensors")) < 100_000  # no packed base weights
    fresh = lk.load_adapter(make("llama"), folder)  # the adapter loads on the 16-bit base too
    assert all(torch.equal(a, b) for a, b in zip(_adapter(fresh).values(), _adapter(model).values()))
    lk.eject(model, merge=False)
    assert "_hf_peft_config_loaded" not in model.__dict__ and not model._hf_peft_config_loaded


def test_save_pretrained_lays_out_several_adapters_as_peft_does(tmp_path):
    model = _adapted()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, targets=["o_proj"]), name="other")
    from models import randomize
    randomize(model, std=0.1)
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "other"} <= set(_files(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(_files(tmp_path / "other"))
    fresh = lk.load_adapter(make("llama"), tmp_path)
    lk.load_adapter(fresh, tmp_path / "other", name="other")
    assert all(torch.equal(a, b) for a, b in zip(_adapter(fresh).values(), _adapter(model).values()))
    model.save_pretrained(tmp_path / "elsewhere", is_main_process=False)  # other ranks write nothing
    assert not (tmp_path / "elsewhere").exists()


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for one forward's backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x).loss
    return sum(seen.values())


def test_fuse_can_replace_liger_style_instance_forwards_and_keeps_the_memory_saving():
    model = make("llama")
    originals = {}
    for name, module in model.named_modules():  # as Trainer(use_liger_kernel=True) patches a built model
        if type(module).__name__ == "LlamaMLP":
            module.forward = originals[name] = _stand_in_mlp_forward.__get__(module)
        elif type(module).__name__ == "LlamaRMSNorm":
            module.forward = originals[name] = StandInRMSNorm.forward.__get__(module)
    torch.manual_seed(1)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    from models import randomize
    randomize(model, std=0.1)
    model.train()
    x = torch.randint(0, 96, (2, 10))
    reference = _outputs_and_grads(model, x)
    lk.set_fast_path("on", triton=False)
    try:
        kept = lk.fuse(model)
        saved_kept = _saved_bytes(model, x)
        kept.undo()
        handle = lk.fuse(model, replace_instance_forwards=True)
        saved_replaced = _saved_bytes(model, x)
        fused = _outputs_and_grads(model, x)
    finally:
        lk.set_fast_path("auto", triton=True)
    report = handle.report()
    assert "producer model.layers.0.mlp (LlamaMLP, its instance forward replaced)" in report
    assert "producer model.layers.0.input_layernorm (LlamaRMSNorm, its instance forward replaced)" in report
    assert saved_replaced < saved_kept  # the LoRA inputs are rebuilt in backward, not kept
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-5)
    for name in reference[1]:
        torch.testing.assert_close(fused[1][name], reference[1][name], rtol=1e-4, atol=1e-5)
    handle.undo()
    for name, forward in originals.items():  # the user's (Liger's) forwards are back
        assert model.get_submodule(name).__dict__["forward"] is forward
