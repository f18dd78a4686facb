"""`lorakit train --quantize` and `lorakit eval --quantize`: QLoRA runs on the CPU with a tiny Llama."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from models import SHARED, cli_fails_cleanly  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit import models  # noqa: E402
from lorakit.cli import main  # noqa: E402

pytestmark = pytest.mark.skipif(not (SHARED / "gpt2-tokenizer" / "tokenizer.json").exists(),
                                reason="../shared/data (GPT-2 tokenizer) not present")


def train_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(out),
            "--targets", "all-linear", "--r", "4", "--alpha", "8", "--lr", "0.03", "--batch-size", "4",
            "--log-every", "1", "--warmup-ratio", "0", "--eval-generate", "false", "--cuda-graphs", "off", *extra]


def packed(model) -> dict[str, torch.Tensor]:
    """Every quantized weight's storage, copied."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


@pytest.fixture(scope="module")
def qlora_run(tiny_model, sft_file, tmp_path_factory):
    """A 2-step `train --quantize nf4` run with a checkpoint after each step: (output folder, the trained model,
    its quantized weights as loaded)."""
    loaded = {}
    load_model = models.load_model

    def spy(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)
        loaded["model"], loaded["packed"] = model, packed(model)
        return model, tok

    out = tmp_path_factory.mktemp("runs") / "qlora"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_model", spy)
        assert main(train_args(tiny_model, sft_file, out, "--quantize", "nf4", "--max-steps", "2",
                               "--save-every", "1")) == 0
    return out, loaded["model"], loaded["packed"]


def test_train_quantize_trains_adapters_and_leaves_the_quantized_weights(qlora_run):
    out, model, before = qlora_run
    layers = dict(lk.lora_layers(model))
    assert layers and all(type(layer._base).__name__ == "Linear4bit" for layer in layers.values())
    assert before, "the base was loaded quantized"
    after = packed(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert any(layer.adapters["default"].lora_B.abs().sum() > 0 for layer in layers.values())  # B left 0 at init
    losses = [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (out / "adapter" / "adapter_config.json").is_file()
    import yaml
    assert yaml.safe_load((out / "run_config.yaml").read_text())["train"]["quantize"] == "nf4"


@pytest.mark.parametrize("quantize", [["--quantize", "nf4"], []])
def test_eval_loads_the_qlora_adapter_on_a_quantized_and_a_16bit_base(tiny_model, sft_file, qlora_run, quantize,
                                                                      capsys, monkeypatch):
    out, trained, _ = qlora_run
    loaded = {}
    load_model = models.load_model

    def spy(*args, **kwargs):
        loaded["model"], tok = load_model(*args, **kwargs)
        return loaded["model"], tok

    monkeypatch.setattr(models, "load_model", spy)
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model), "--eval-file", str(sft_file), "--adapter",
                 str(out / "adapter"), "--eval-generate", "false", "--max-eval-examples", "8", *quantize]) == 0
    result = json.loads(capsys.readouterr().out)
    assert math.isfinite(result["loss"])
    layers = dict(lk.lora_layers(loaded["model"]))
    assert layers and all(type(layer._base).__name__ == ("Linear4bit" if quantize else "Linear")
                          for layer in layers.values())
    assert not any(layer.merged for layer in layers.values())
    for path, layer in dict(lk.lora_layers(trained)).items():
        assert torch.equal(layers[path].adapters["default"].lora_B, layer.adapters["default"].lora_B.detach())


def test_full_with_quantize_is_refused(tiny_model, sft_file, tmp_path, capsys):
    out = tmp_path / "full"
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, out, "--full", "--quantize", "nf4", "--max-steps", "1"),
                  "--full", "--quantize")
    assert not out.exists()


@pytest.mark.parametrize("flags,named", [(["--quantize", "fp4"], "'nf4' -> 'fp4'"), ([], "'nf4' -> None")])
def test_resume_with_another_quantize_is_refused(tiny_model, sft_file, qlora_run, tmp_path, capsys, flags, named):
    out = Path(shutil.copytree(qlora_run[0], tmp_path / "run"))
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, out, "--resume", "--max-steps", "3", *flags),
                  "--quantize", named)
