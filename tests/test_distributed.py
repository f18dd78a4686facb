"""Data-parallel training on 2 CPU processes (gloo) equals single-process training.

One process with batch 4 and two processes with batch 2 each see the same 4 examples at every
step (LengthGroupedBatchSampler slices global batches), and every example has the same number of
tokens, so the mean of the two ranks' mean losses is the global mean: DDP and FSDP2 must give the
same loss curve and the same adapter file as one process, within float tolerance. A 2-process run
stopped right after a checkpoint resumes on 1 process and ends where the uninterrupted run ends.

One launch only (process start-up dominates on a small CPU): torchrun starts a small worker
that runs the DDP training, the FSDP2 training and the stopped run in one process group through
`lorakit.cli.main`, while this process trains the single-process reference. `lorakit train
--nproc` is checked up to the torchrun call it makes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lorakit as lk
from lorakit import distributed
from lorakit.cli import main
from lorakit.data import LengthGroupedBatchSampler
from models import SHARED

TOKENIZER = SHARED / "gpt2-tokenizer" / "tokenizer.json"
pytestmark = pytest.mark.skipif(not TOKENIZER.exists() or not torch.distributed.is_available(),
                                reason="needs ../shared/data (GPT-2 tokenizer) and torch.distributed")
REPO = Path(__file__).resolve().parents[1]
STEPS, STOP = 10, 4  # 8 steps make an epoch of the 32 examples: the run crosses into epoch 1

WORKER = '''
"""torchrun worker: full runs, then a run stopped (as by Ctrl-C) right after a checkpoint."""
import json, sys
import torch.distributed as dist
import lorakit.train.checkpoints as C
from lorakit.cli import main

full_runs, stop_argv, stop_step, refused = json.loads(sys.argv[1])
dist.init_process_group("gloo")  # one group for all runs: lorakit uses it and leaves it open
for argv in full_runs:
    assert main(argv) == 0
for argv in refused:
    assert main(argv) == 2
save = C.save_checkpoint

def save_then_stop(out, model, optimizer, scheduler, state, ctx=None, **kwargs):
    save(out, model, optimizer, scheduler, state, ctx, **kwargs)
    if state["step"] >= stop_step:
        raise KeyboardInterrupt

C.save_checkpoint = save_then_stop
assert main(stop_argv) == 130
dist.destroy_process_group()
'''


def train_args(model, data, out, batch_size, *extra):
    return ["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(out),
            "--targets", "all-linear", "--r", "8", "--alpha", "16", "--lr", "0.03", "--batch-size", str(batch_size),
            "--log-every", "1", "--warmup-ratio", "0", "--max-steps", str(STEPS), "--save-every", "2",
            "--eval-generate", "false", *extra]


def losses(out: Path) -> list[float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def assert_same_adapter(a: Path, b: Path) -> None:
    """Same tensors (within float tolerance), same adapter_config.json, same lorakit metadata."""
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-5)
    assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()
    with safe_open(a / "adapter_model.safetensors", "pt") as fa, safe_open(b / "adapter_model.safetensors", "pt") as fb:
        assert fa.metadata() == fb.metadata()


def _has_bitsandbytes() -> bool:
    import importlib.util
    return importlib.util.find_spec("bitsandbytes") is not None


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")


def test_global_batches_do_not_depend_on_the_split():
    """Step k's examples are one process's batch k of batch_size x num_replicas, for any split."""
    lengths = [(i * 37) % 101 + 1 for i in range(1003)]
    one = LengthGroupedBatchSampler(lengths, 8, seed=3)
    one.set_epoch(1)
    single = list(one)
    for replicas in (2, 4, 8):
        ranks = []
        for r in range(replicas):
            s = LengthGroupedBatchSampler(lengths, 8 // replicas, seed=3, num_replicas=replicas, rank=r)
            s.set_epoch(1)
            assert s.num_batches == one.num_batches
            ranks.append(list(s))
        joined = [sum((rank[k] for rank in ranks), []) for k in range(len(single))]
        # 1003 = 125 x 8 + 3: the short batch is padded (wrapping around) so every rank gets one example
        short = next(k for k, b in enumerate(single) if len(b) < 8)
        assert joined[:short] + joined[short + 1:] == single[:short] + single[short + 1:]
        assert joined[short][:3] == single[short] and len({len(rank[short]) for rank in ranks}) == 1


def test_resume_position_with_another_global_batch():
    from lorakit.train import _resume_batch
    sampler = LengthGroupedBatchSampler([5] * 64, 4, num_replicas=2)  # global batch 8
    assert _resume_batch({"batch": 3, "global_batch": 8}, sampler, print) == 3
    assert _resume_batch({"batch": 3}, sampler, print) == 3  # written before the field existed
    notes = []
    assert _resume_batch({"batch": 6, "global_batch": 4}, sampler, notes.append) == 3  # 24 examples in
    assert "keep batch size x processes = 4" in notes[0]


def test_strategy_and_nproc_errors(tiny_model, sft_file, tmp_path, capsys, monkeypatch):
    for var in distributed.LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    code = main(train_args(tiny_model, sft_file, tmp_path / "o", 4, "--strategy", "fsdp"))
    err = capsys.readouterr().err
    assert code == 2 and "--nproc N" in err and "torchrun" in err
    code = main(train_args(tiny_model, sft_file, tmp_path / "o", 4, "--strategy", "zero3"))
    assert code == 2 and "strategy must be one of" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(lk.ConfigError, match="--nproc 4 needs 4 GPUs.*has 2"):
        distributed.launch(["train"], 4)
    assert not (tmp_path / "o").exists()


def test_nproc_relaunches_through_torchrun(tiny_model, sft_file, tmp_path, monkeypatch):
    import torch.distributed.run as torchrun
    for var in distributed.LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(torchrun, "run", calls.append)
    argv = train_args(tiny_model, sft_file, tmp_path / "o", 2, "--strategy", "fsdp")
    assert main(["--debug", argv[0], "--nproc", "2", *argv[1:]]) == 0
    (args,) = calls
    assert args.nproc_per_node == "2" and args.standalone and args.module and args.training_script == "lorakit"
    assert args.training_script_args == ["--debug", *argv]  # the same command, minus --nproc
    assert not (tmp_path / "o").exists()


def test_ddp_fsdp_and_resume_match_single_process(tiny_model, sft_file, tmp_path):
    ddp, fsdp, stopped, single = (tmp_path / n for n in ("ddp", "fsdp", "stopped", "single"))
    qlora_ddp, qlora_single = tmp_path / "qlora-ddp", tmp_path / "qlora-single"
    qlora = ["--quantize", "nf4"] if _has_bitsandbytes() else []
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    spec = [[train_args(tiny_model, sft_file, ddp, 2, "--strategy", "ddp"),
             train_args(tiny_model, sft_file, fsdp, 2, "--strategy", "fsdp")]
            + ([train_args(tiny_model, sft_file, qlora_ddp, 2, "--strategy", "ddp", *qlora)] if qlora else []),
            train_args(tiny_model, sft_file, stopped, 2, "--strategy", "fsdp"), STOP,
            [train_args(tiny_model, sft_file, tmp_path / "qlora-fsdp", 2, "--strategy", "fsdp", *qlora)] if qlora
            else []]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(worker), json.dumps(spec)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the references train while the workers start
        assert main(train_args(tiny_model, sft_file, single, 4)) == 0
        if qlora:
            assert main(train_args(tiny_model, sft_file, qlora_single, 4, *qlora)) == 0
        log = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-3000:]
    assert log.count("== lorakit train: done ==") == 2 + bool(qlora)  # rank 0 alone prints, once per full run
    reference = losses(single)
    assert len(reference) == STEPS

    for run in (ddp, fsdp):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["strategy"] == run.name
        assert losses(run) == pytest.approx(reference, rel=1e-5)  # one line per step: only rank 0 writes
        assert_same_adapter(single / "adapter", run / "adapter")
        torch.testing.assert_close(load_file(run / "checkpoint" / "trainable.safetensors"),
                                   load_file(single / "checkpoint" / "trainable.safetensors"), rtol=1e-4, atol=1e-5)

    if qlora:  # QLoRA under DDP: each process holds the whole 4-bit base, the adapters train as in one process
        assert losses(qlora_ddp) == pytest.approx(losses(qlora_single), rel=1e-5)
        assert_same_adapter(qlora_single / "adapter", qlora_ddp / "adapter")
        assert "--strategy ddp" in log and not (tmp_path / "qlora-fsdp" / "adapter").exists()

    progress = json.loads((stopped / "checkpoint" / "progress.json").read_text())
    assert progress["step"] == STOP and progress["world_size"] == 2 and progress["global_batch"] == 4
    assert not (stopped / "adapter").exists()
    # the FSDP checkpoint holds full tensors in the single-process format: one process continues it
    assert main(train_args(tiny_model, sft_file, stopped, 4, "--resume")) == 0
    assert losses(stopped) == pytest.approx(reference, rel=1e-5)
    assert_same_adapter(single / "adapter", stopped / "adapter")
