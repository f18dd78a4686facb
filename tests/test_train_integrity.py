"""`lorakit train` and the CLI under misuse and failure: a run folder holds one run, a damaged or
mismatched checkpoint is refused with a message, a full disk says so, merge cleans up after killed
runs, and paths with `=` or files where folders belong are handled."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import SHARED, cli_fails_cleanly

import lorakit as lk
from lorakit.cli import main

TOKENIZER = SHARED / "gpt2-tokenizer" / "tokenizer.json"
pytestmark = pytest.mark.skipif(not TOKENIZER.exists(), reason="../shared/data (GPT-2 tokenizer) not present")


def train_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(out),
            "--targets", "q_proj,v_proj", "--r", "8", "--alpha", "16", "--lr", "0.03", "--batch-size", "4",
            "--log-every", "1", "--warmup-ratio", "0", "--eval-generate", "false", "--cuda-graphs", "off", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_model, sft_file, tmp_path_factory) -> Path:
    """A run of 2 steps with a checkpoint after each (the last at step 2)."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(train_args(tiny_model, sft_file, out, "--max-steps", "2", "--save-every", "1")) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def train_steps(out: Path) -> list[int]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["step"] for e in events if e["event"] == "train"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- one run per folder ------------------------------------------------------------------------------
def test_a_second_run_into_a_run_folder_is_refused_and_overwrite_replaces_it(tiny_model, sft_file, finished_run,
                                                                             tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    before = snapshot(out)
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, out, "--max-steps", "1"), "earlier run", "--resume",
                  "--overwrite", "checkpoint")
    assert snapshot(out) == before  # nothing mixed in

    assert main(train_args(tiny_model, sft_file, out, "--max-steps", "1", "--overwrite")) == 0
    assert train_steps(out) == [1]  # the old run's steps 1 and 2 are gone
    assert not (out / "checkpoint").exists()  # the old step-2 checkpoint too: --resume cannot pick it up
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert "overwrite: true" in (out / "run_config.yaml").read_text()


def test_overwrite_deletes_only_a_runs_own_files(tiny_model, sft_file, finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, out, "--max-steps", "1", "--overwrite"), "notes.txt")
    assert snapshot(out) == before

    # a folder of the user's with an adapter/ in it, not a lorakit run: --overwrite does not empty it
    mine = tmp_path / "mine"
    lk_adapter = mine / "adapter"
    lk_adapter.mkdir(parents=True)
    (lk_adapter / "adapter_config.json").write_text("{}")
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, mine, "--max-steps", "1", "--overwrite"),
                  "no run_config.yaml")
    assert (lk_adapter / "adapter_config.json").read_text() == "{}"

    # files a run does not write do not make a folder a run: training next to them is fine
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    assert main(train_args(tiny_model, sft_file, plain, "--max-steps", "1")) == 0
    assert (plain / "notes.txt").read_text() == "mine"
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, out, "--resume", "--overwrite"), "pass one of them")


def test_an_existing_file_as_output_folder_is_a_clean_error(tiny_model, sft_file, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("x")
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, file, "--max-steps", "1"), str(file), "is a file")
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, file / "run", "--max-steps", "1"), "is a file")
    cli_fails_cleanly(capsys, ["merge", "--model", str(tiny_model), "--adapter", str(tmp_path), "--output", str(file)],
                  "--output", "is a file")
    assert file.read_text() == "x"


# -- resume --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, named", [
    (["--lr", "1e-2"], "--lr 0.03 -> 0.01"),
    (["--r", "4"], "--r 8 -> 4"),
    (["--targets", "q_proj"], "--targets"),
    (["--seed", "1"], "--seed 0 -> 1"),
])
def test_resume_refuses_settings_that_differ_from_the_checkpoints(tiny_model, sft_file, finished_run, tmp_path,
                                                                  capsys, flags, named):
    out = copy_of(finished_run, tmp_path)
    before = snapshot(out)
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, out, "--resume", *flags), named, "--overwrite")
    assert snapshot(out) == before


def test_resume_with_another_model_is_refused(tiny_model, sft_file, finished_run, tmp_path, capsys):
    other = Path(shutil.copytree(tiny_model, tmp_path / "other-model"))
    out = copy_of(finished_run, tmp_path)
    cli_fails_cleanly(capsys, train_args(other, sft_file, out, "--resume", "--max-steps", "3"), "--model")


def test_resume_may_change_how_long_and_how_it_runs(tiny_model, sft_file, finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    assert main(train_args(tiny_model, sft_file, out, "--resume", "--max-steps", "3", "--log-every", "2",
                           "--threads", "1")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_a_checkpoint_of_other_shapes_is_refused_without_its_run_config(tiny_model, sft_file, finished_run,
                                                                         tmp_path, capsys):
    """Checkpoints written before they kept their settings: the shapes of the weights still tell."""
    out = copy_of(finished_run, tmp_path)
    (out / "checkpoint" / "run_config.yaml").unlink()
    (out / "run_config.yaml").unlink()
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, out, "--resume", "--r", "4"), "does not match",
                  "(8, 32) in the checkpoint, (4, 32) here", "--r")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, named", [
    (lambda c: (c / "trainable.safetensors").unlink(), "trainable.safetensors missing"),
    (lambda c: _truncate(c / "trainable.safetensors"), "trainable.safetensors is damaged"),
    (lambda c: (c / "state.pt").unlink(), "state.pt missing"),
    (lambda c: _truncate(c / "state.pt"), "state.pt is damaged"),
    (lambda c: (c / "state.pt").write_bytes(b"\0" * 64), "state.pt is damaged"),
    (lambda c: (c / "progress.json").write_text('{"step": 2, "epo'), "progress.json is damaged"),
    (lambda c: (c / "progress.json").write_text('{"step": "two", "epoch": 0, "batch": 2}'), "progress.json is damaged"),
    (lambda c: (c / "progress.json").unlink(), "progress.json missing"),
    (lambda c: shutil.rmtree(c), "no checkpoint"),
])
def test_resume_on_a_damaged_checkpoint_names_the_file_and_the_fix(tiny_model, sft_file, finished_run, tmp_path,
                                                                   capsys, damage, named):
    out = copy_of(finished_run, tmp_path)
    damage(out / "checkpoint")
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, out, "--resume", "--max-steps", "3"), named,
                  "--overwrite")


def test_metrics_hold_each_step_once_after_a_resume(tiny_model, sft_file, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_model, sft_file, out, "--max-steps", "5", "--save-every", "2",
                           "--eval-file", str(sft_file), "--max-eval-examples", "4")) == 0
    assert train_steps(out) == [1, 2, 3, 4, 5]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "st')  # a record cut short by a kill
    # the checkpoint is at step 4: step 5 and the final eval are trained and evaluated again
    assert main(train_args(tiny_model, sft_file, out, "--max-steps", "6", "--save-every", "2",
                           "--eval-file", str(sft_file), "--max-eval-examples", "4", "--resume")) == 0
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("final")] == [6]


# -- a full disk -------------------------------------------------------------------------------------
class FullDisk:
    """`open` for the module under test: files open for real, and from the `fail_at`-th file opened for
    writing on, a write stores part of its bytes and then fails with ENOSPC, as on a full disk."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.opened = fail_at, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)  # noqa: SIM115 (the caller closes it)
        if "w" not in mode and "a" not in mode:
            return f
        self.opened += 1
        return _FullFile(f) if self.opened >= self.fail_at else f


class _FullFile:
    def __init__(self, f) -> None:
        self._f = f

    def write(self, data) -> int:
        self._f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("fail_at", [5, 6], ids=["weights", "optimizer-state"])
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_last_one(tiny_model, sft_file, tmp_path, capsys,
                                                                       monkeypatch, fail_at):
    from lorakit.train import checkpoints

    out = tmp_path / "run"
    # the first checkpoint writes 4 files; the second fails in its weights (5) or its optimizer state (6,
    # which torch.save writes, and reports only as "unexpected pos" by itself)
    monkeypatch.setattr(checkpoints, "open", FullDisk(fail_at), raising=False)
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, out, "--max-steps", "3", "--save-every", "1"),
                  "No space left on device", str(out / "checkpoint"), "--resume")
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 1
    assert not (out / ".checkpoint-tmp").exists()
    monkeypatch.undo()  # space freed: the run continues from its last checkpoint
    assert main(train_args(tiny_model, sft_file, out, "--max-steps", "3", "--save-every", "1", "--resume")) == 0
    assert train_steps(out) == [1, 2, 3]


def test_a_full_disk_while_saving_the_adapter_says_so(tiny_model, sft_file, tmp_path, capsys, monkeypatch):
    import lorakit.io

    monkeypatch.setattr(lorakit.io, "open", FullDisk(1), raising=False)  # the adapter's first file fills the disk
    out = tmp_path / "run"
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, out, "--max-steps", "1"), "No space left on device",
                  str(out / "adapter"))


# -- merge and --adapter -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory) -> Path:
    """An adapter in a folder whose path holds `=` (as a sweep names its runs)."""
    from lorakit.models import load_model
    model, _ = load_model(str(tiny_model))
    torch.manual_seed(0)
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters["default"].lora_B.normal_()
    return lk.save_adapter(model, tmp_path_factory.mktemp("sweep") / "lr=1e-3" / "adapter")


def test_adapter_paths_with_equals_signs(tiny_model, adapter_dir, sft_file, capsys, monkeypatch):
    from lorakit.cli import adapter_spec
    monkeypatch.chdir(adapter_dir.parent.parent)
    assert adapter_spec(str(adapter_dir)) == ("default", str(adapter_dir))
    assert adapter_spec("lr=1e-3/adapter") == ("default", "lr=1e-3/adapter")  # an existing path wins
    assert adapter_spec(f"tuned={adapter_dir}") == ("tuned", str(adapter_dir))
    assert adapter_spec("no/such=dir") == ("default", "no/such=dir")  # no adapter is named "no/such"
    for spec in (str(adapter_dir), f"tuned={adapter_dir}"):
        assert main(["eval", "--model", str(tiny_model), "--adapter", spec, "--eval-file", str(sft_file),
                     "--eval-generate", "false"]) == 0
        out = capsys.readouterr().out
        assert json.loads(out[out.index("{"):])["loss"] > 0
    assert main(["generate", "--model", str(tiny_model), "--adapter", str(adapter_dir), "--prompt", "Say red:",
                 "--max-new-tokens", "2"]) == 0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_merge_removes_what_killed_merges_left(tiny_model, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    host = socket.gethostname().replace("-", "_")
    stale = tmp_path / f".merged.lorakit-merge-{host}-{_dead_pid()}-k2j3"
    live = tmp_path / f".merged.lorakit-merge-{host}-{os.getpid()}-a8f1"  # a merge still running
    foreign = tmp_path / ".merged.backup"
    for d in (stale, live, foreign):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
    assert main(["merge", "--model", str(tiny_model), "--adapter", str(adapter_dir), "--output", str(out)]) == 0
    assert not stale.exists() and live.exists() and foreign.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, foreign.name])
    assert (out / "config.json").exists()
