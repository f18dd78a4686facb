"""The reproduction's GLUE loop (benchmarks/repro_glue.py) is `lorakit train`'s loop: same weights out."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from models import SHARED

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
MRPC = SHARED / "glue" / "MRPC"


@pytest.fixture
def tiny_bert(tmp_path):
    """A 2-layer BERT with minilm-l6's tokenizer, saved without a classifier head (as minilm-l6 is)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorakit.errors import ConfigError
    from lorakit.models import resolve_model_path
    try:
        src = resolve_model_path("minilm-l6")
    except ConfigError:
        pytest.skip("minilm-l6 (its tokenizer) is not installed")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=512)
    path = tmp_path / "bert"
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return path


@pytest.fixture
def mrpc_sample(tmp_path):
    if not MRPC.exists():
        pytest.skip("shared GLUE data not available")
    data = tmp_path / "glue" / "MRPC"
    data.mkdir(parents=True)
    for split, n in (("train", 48), ("dev", 16)):
        lines = (MRPC / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        (data / f"{split}.tsv").write_text("".join(lines[: n + 1]), encoding="utf-8")
    return data


def test_glue_loop_matches_lorakit_train(tiny_bert, mrpc_sample, tmp_path):
    from safetensors.torch import load_file

    import repro_glue
    from lorakit.config import LoraConfig
    from lorakit.data import DataConfig
    from lorakit.train import RunConfig, TrainConfig, run

    job = {"model": str(tiny_bert), "data": str(mrpc_sample.parent), "out": str(tmp_path / "repro"),
           "task": "MRPC", "method": "lorakit", "seed": 3, "r": 8, "lr": 1e-3, "epochs": 2}
    ours = repro_glue.run_job(job)

    cfg = RunConfig(
        TrainConfig(model=str(tiny_bert), train_file=str(mrpc_sample / "train.tsv"),
                    eval_file=str(mrpc_sample / "dev.tsv"), output_dir=str(tmp_path / "cli"), lr=1e-3, epochs=2,
                    batch_size=repro_glue.BATCH, warmup_ratio=0.06, max_eval_examples=0, seed=3),
        DataConfig(task="classification", max_length=repro_glue.MAX_LENGTH),
        LoraConfig(r=8, alpha=16, targets=["query", "value"]))
    theirs = run(cfg, log=lambda *a: None)

    assert ours["steps"] == theirs["steps"] == 4
    assert ours["trainable_parameters"] == theirs["trainable_parameters"]
    a = load_file(str(tmp_path / "repro" / "adapters" / ours["run"] / "adapter_model.safetensors"))
    b = load_file(str(Path(theirs["adapter_dir"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("classifier" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    assert ours["final"]["accuracy"] == pytest.approx(theirs["after"]["accuracy"])
    shutil.rmtree(tmp_path / "cli", ignore_errors=True)
