"""Tiny random models for the contract tests, built from configs (no download)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

# ../shared/data beside the checkout, or where LORAKIT_SHARED_DATA points
SHARED = Path(os.environ.get("LORAKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 24, bias=False)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.conv1d = nn.Conv1d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (b, 8, 3, 3)
        h = self.conv1d(h.flatten(2))  # (b, 6, 9)
        return self.fc(h.mean(-1))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def bert():
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg)


def make(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = {"mlp": MLP, "conv": ConvNet, "gpt2": gpt2, "llama": llama, "bert": bert}[kind]()
    return model.eval()


def example_input(kind: str, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(batch, 12, generator=g)
    if kind == "conv":
        return torch.randn(batch, 3, 8, 8, generator=g)
    return torch.randint(0, 96, (batch, 10), generator=g)


def run(model: nn.Module, kind: str, x) -> torch.Tensor:
    """The model's main output tensor for input x."""
    if kind in ("mlp", "conv"):
        return model(x)
    return model(input_ids=x).logits


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def randomize(model: nn.Module, std: float = 0.5, seed: int = 3) -> None:
    """Give every adapter a non-zero B (and A) so that it changes the output."""
    import lorakit as lk
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            for a in layer.adapters.values():
                for p in (a.lora_A, a.lora_B):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


GPT2_TOKENIZER = SHARED / "gpt2-tokenizer" / "tokenizer.json"


def save_tiny_causal_lm(path):
    """A tiny random Llama with the real GPT-2 tokenizer, saved as a local model directory at `path`; the test
    using it skips where ../shared/data is not beside the checkout."""
    if not GPT2_TOKENIZER.is_file():
        import pytest
        pytest.skip("../shared/data (GPT-2 tokenizer) not present")
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM
    tok = GPT2TokenizerFast(tokenizer_file=str(GPT2_TOKENIZER))
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_sft_file(path):
    """32 prompt/completion records of one length (6 GPT-2 tokens, 3 of them in the loss), as JSONL."""
    import json
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]  # one GPT-2 token each
    rows = [{"prompt": f"Say {w}:", "completion": f" {w} {w}"} for w in words for _ in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def cli_fails_cleanly(capsys, argv, *words) -> str:
    """Run `lorakit argv` in process; it must exit 2 with no traceback and an error naming each of `words`."""
    from lorakit.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def run_under_interpreter(test_module: str) -> None:
    """Run the pytest module `test_module` (a path from the repository root) in a fresh pytest process under
    TRITON_INTERPRET=1, which Triton reads when it first compiles a kernel, and check that it passed."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(root / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider", test_module]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
