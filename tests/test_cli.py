"""CLI smoke tests on tiny random models: the loss falls, kill -9 + resume equals an uninterrupted
run, config precedence, merge/generate/eval/convert, and one-paragraph errors."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import build_parser, main, resolve_config
from models import SHARED, cli_fails_cleanly

TOKENIZER = SHARED / "gpt2-tokenizer" / "tokenizer.json"
pytestmark = pytest.mark.skipif(not TOKENIZER.exists(), reason="../shared/data (GPT-2 tokenizer) not present")
REPO = Path(__file__).resolve().parents[1]


def train_args(model, data, out, *extra):
    return ["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(out),
            "--targets", "all-linear", "--r", "8", "--alpha", "16", "--lr", "0.03", "--batch-size", "4",
            "--log-every", "1", "--warmup-ratio", "0", *extra]


def losses(out: Path) -> list[float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def test_train_loss_falls_and_adapter_is_saved(tiny_model, sft_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model, sft_file, out, "--max-steps", "24", "--eval-file", str(sft_file),
                           "--max-new-tokens", "4")) == 0
    assert len(losses(out)) == 24
    summary = json.loads((out / "summary.json").read_text())
    # held-out loss on the same examples, before and after: a tiny random model learns slowly,
    # but a working loop moves it well beyond noise (the eval is deterministic)
    assert summary["after"]["loss"] < summary["before"]["loss"] - 0.2
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "adapter on disk" in printed
    # the closing hint runs as printed: prompt/completion data was trained on the raw text
    hint = shlex.split(printed.split("try it:\n", 1)[1].splitlines()[0])
    assert hint[:2] == ["lorakit", "generate"] and hint[hint.index("--raw") + 1:][:2] == ["--prompt", "Say red:"]
    assert main(hint[1:]) == 0 and capsys.readouterr().out.startswith("### prompt: Say red:")
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "best" / "adapter_config.json").exists()
    saved = (out / "run_config.yaml").read_text()
    assert "lr: 0.03" in saved and "r: 8" in saved
    from lorakit.models import load_model
    model, _ = load_model(str(tiny_model))
    lk.load_adapter(model, out / "adapter")
    assert len(list(lk.lora_layers(model))) == 14


def test_config_precedence(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.5\nbatch_size: 3\nlora:\n  r: 12\n  targets: all-linear\ndata:\n  max_length: 77\n")
    parser = build_parser()
    parts = resolve_config(parser.parse_args(["train", "--config", str(cfg), "--lr", "0.25"]))
    assert parts["train"].lr == 0.25  # flag beats YAML
    assert parts["train"].batch_size == 3  # YAML beats default
    assert parts["train"].epochs == 1.0  # default
    assert parts["lora"].r == 12 and parts["lora"].targets == "all-linear"
    assert parts["data"].max_length == 77
    parts = resolve_config(parser.parse_args(["train", "--targets", "q_proj,v_proj", "--rslora"]))
    assert parts["lora"].targets == ["q_proj", "v_proj"] and parts["lora"].rslora is True
    cfg.write_text("learning_rate: 1\n")
    with pytest.raises(lk.ConfigError, match="unknown setting 'learning_rate'"):
        resolve_config(parser.parse_args(["train", "--config", str(cfg)]))


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "lorakit", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_gradient_accumulation_logs_the_mean_of_its_micro_batches(tiny_model, sft_file, tmp_path, monkeypatch):
    import lorakit.models
    import lorakit.train

    seen = []  # the loss of every training micro-batch, read off the model's own output
    real_load = lorakit.models.load_model

    def load_and_watch(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        model.register_forward_hook(lambda m, i, out: seen.append(float(out.loss.detach())) if m.training else None)
        return model, tok

    monkeypatch.setattr(lorakit.models, "load_model", load_and_watch)
    out = tmp_path / "accum"
    # (eager steps: the hook reads the loss, a host synchronization that a captured step could not hold)
    assert main(train_args(tiny_model, sft_file, out, "--max-steps", "3", "--batch-size", "2", "--grad-accum", "2",
                           "--eval-generate", "false", "--cuda-graphs", "off")) == 0
    logged = losses(out)
    assert len(logged) == 3 and len(seen) == 6
    for step, loss in enumerate(logged):
        assert loss == pytest.approx((seen[2 * step] + seen[2 * step + 1]) / 2, rel=1e-6)
    assert len({round(v, 6) for v in seen}) == 6  # six different micro-batches, not one loss repeated


def test_kill_and_resume_equals_uninterrupted(tiny_model, sft_file, tmp_path):
    common = ["--max-steps", "16", "--save-every", "1", "--dropout", "0.1", "--eval-generate", "false"]
    full = tmp_path / "full"
    assert main(train_args(tiny_model, sft_file, full, *common)) == 0

    killed = tmp_path / "killed"
    proc = _run_cli(train_args(tiny_model, sft_file, killed, *common))
    progress = killed / "checkpoint" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.exists():
            try:
                if json.loads(progress.read_text())["step"] >= 6:
                    break
            except (json.JSONDecodeError, OSError):
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(progress.read_text())["step"]
    assert 6 <= step < 16, "the run must be killed mid-way"
    assert not (killed / "adapter").exists()
    assert main(train_args(tiny_model, sft_file, killed, *common, "--resume")) == 0
    from safetensors.torch import load_file
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tiny_model, sft_file, tmp_path, capsys):
    out = tmp_path / "nan"
    # Adam moves every weight by ~lr per step: 1e30 makes the second forward pass overflow.
    code = main(train_args(tiny_model, sft_file, out, "--max-steps", "6", "--lr", "1e30", "--max-grad-norm", "0",
                           "--save-every", "1", "--eval-generate", "false"))
    err = capsys.readouterr().err
    assert code == 2 and "The loss became" in err and "--resume" in err and "Traceback" not in err
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    assert 1 <= progress["step"] < 6
    import safetensors.torch as st
    for t in st.load((out / "checkpoint" / "trainable.safetensors").read_bytes()).values():
        assert torch.isfinite(t).all()
    assert not (out / "adapter").exists()


def test_errors_are_one_paragraph(tiny_model, sft_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    code = main(train_args(tiny_model, bad, tmp_path / "o1", "--max-steps", "1"))
    err = capsys.readouterr().err
    assert code == 2 and "'prompt'" in err and "question" in err and "Traceback" not in err
    assert not (tmp_path / "o1").exists()  # nothing written for a run that could not start

    code = main(["train", "--model", "no-such-model", "--output-dir", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and "smollm2-135m" in err

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        code = main(train_args(tiny_model, sft_file, ro / "out", "--max-steps", "1"))
        assert code == 2 and "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_merge_generate_eval_convert(tiny_model, sft_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model, sft_file, out, "--max-steps", "20", "--eval-generate", "false")) == 0
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model), "--adapter", str(out / "adapter"), "--output", str(merged)]) == 0
    text = capsys.readouterr().out
    diff = float(text.split("difference on a sample: ")[1].split()[0])
    assert diff < 1e-4
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in k for k in plain.state_dict())

    assert main(["generate", "--model", str(tiny_model), "--adapter", f"a={out / 'adapter'}", "--prompt", "Say red:",
                 "--prompt", "Say cat:", "--route", "a,base", "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert "[a]" in text and "[base]" in text
    assert main(["generate", "--model", str(merged), "--prompt", "Say red:", "--max-new-tokens", "3",
                 "--num-beams", "2"]) == 0
    capsys.readouterr()
    greedy = ["generate", "--model", str(merged), "--prompt", "Say red:", "--max-new-tokens", "4"]
    assert main(greedy) == 0
    want = capsys.readouterr().out
    assert main(greedy + ["--sample", "--top-k", "1", "--temperature", "2.0"]) == 0  # one token left: greedy's
    assert capsys.readouterr().out == want
    assert main(["eval", "--model", str(tiny_model), "--adapter", str(out / "adapter"), "--eval-file", str(sft_file),
                 "--eval-generate", "false"]) == 0
    text = capsys.readouterr().out
    result = json.loads(text[text.index("{"):])
    assert result["loss"] > 0 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-4)


def test_convert_loralib(tmp_path, capsys):
    ckpt = SHARED / "loralib-checkpoint" / "roberta_base_lora_mnli.bin"
    if not ckpt.exists():
        pytest.skip("no loralib checkpoint")
    from transformers import GPT2TokenizerFast, RobertaConfig, RobertaForSequenceClassification
    base = tmp_path / "roberta"
    cfg = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, num_labels=3,
                        pad_token_id=1)
    RobertaForSequenceClassification(cfg).save_pretrained(base)
    tok = GPT2TokenizerFast(tokenizer_file=str(TOKENIZER))
    tok.save_pretrained(base)
    assert main(["convert", str(ckpt), "--model", str(base), "--alpha", "16", "--task", "classification",
                 "--num-labels", "3", "--output", str(tmp_path / "peft")]) == 0
    cfgj = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfgj["r"] == 8 and cfgj["lora_alpha"] == 16 and len(cfgj["target_modules"]) == 24


def test_analyze_two_adapters(tiny_model, tmp_path, capsys):
    from lorakit.models import load_model
    dirs = []
    for seed, r in ((0, 8), (1, 4)):
        model, _ = load_model(str(tiny_model))
        torch.manual_seed(seed)
        lk.inject(model, lk.LoraConfig(r=r, alpha=2 * r, targets=["q_proj", "v_proj"]))
        with torch.no_grad():
            for _, layer in lk.lora_layers(model):
                layer.adapters["default"].lora_B.normal_()
        dirs.append(lk.save_adapter(model, tmp_path / f"a{seed}"))
    out = tmp_path / "analysis"
    assert main(["analyze", str(dirs[0]), str(dirs[1]), "--model", str(tiny_model), "--output", str(out)]) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert len(report["modules"]) == 4
    assert list(out.glob("*.png"))


def test_eval_generation_metrics_groups_references(tiny_model, tmp_path, capsys, monkeypatch):
    from lorakit.eval import metrics
    seen = {}
    real = metrics.generation_scores

    def without_meteor(hyps, refs, **kw):  # METEOR needs a JVM and ~30 s: covered in test_metrics
        seen["refs"] = refs
        return real(hyps, refs, with_meteor=False)

    monkeypatch.setattr(metrics, "generation_scores", without_meteor)
    data = tmp_path / "e2e.jsonl"
    rows = [("name[A], food[Thai]", "A serves Thai food."), ("name[A], food[Thai]", "Thai food at A."),
            ("name[B]", "This is B.")]
    data.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in rows) + "\n")
    preds = tmp_path / "preds.txt"
    assert main(["eval", "--model", str(tiny_model), "--eval-file", str(data), "--eval-generate", "false",
                 "--generation-metrics", "--max-new-tokens", "4", "--predictions", str(preds)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert seen["refs"] == [["A serves Thai food.", "Thai food at A."], ["This is B."]]
    assert {"BLEU", "NIST", "ROUGE_L", "CIDEr"} <= set(result) or {"bleu", "nist", "rouge_l", "cider"} <= set(result)
    assert len(preds.read_text().splitlines()) == 2


def _varied_sft_file(path: Path) -> Path:
    """Prompt/completion records of 5 to about 65 GPT-2 tokens."""
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    rows = [{"prompt": f"Say {w}:", "completion": " " + " ".join([w] * (1 + 2 * i))} for i, w in
            enumerate(words * 4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _watch_training_shapes(monkeypatch) -> list[tuple[int, int]]:
    import lorakit.models

    shapes = []
    real_load = lorakit.models.load_model

    def load_and_watch(*args, **kwargs):
        model, tok = real_load(*args, **kwargs)
        model.register_forward_hook(
            lambda m, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)) if m.training else None,
            with_kwargs=True)
        return model, tok

    monkeypatch.setattr(lorakit.models, "load_model", load_and_watch)
    return shapes


@pytest.mark.parametrize("resume", [False, True])
def test_cuda_graphs_pads_to_its_lengths_and_trains_as_the_plain_loop(tiny_model, tmp_path, monkeypatch, resume):
    from lorakit.train import graph_lengths

    data = _varied_sft_file(tmp_path / "varied.jsonl")
    shapes = _watch_training_shapes(monkeypatch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # fp32 and dropout 0: padding is the only difference between the runs
    # constant schedule: the resumed runs stop at other --max-steps
    common = ["--epochs", "1", "--batch-size", "5", "--dropout", "0", "--eval-generate", "false",
              "--precision", "fp32", "--max-grad-norm", "0.5", "--schedule", "constant"]
    assert main(train_args(tiny_model, data, tmp_path / "plain", *common, "--cuda-graphs", "off")) == 0
    plain_shapes = list(shapes)
    shapes.clear()
    graphed = tmp_path / "graphed"
    if resume:  # half the run with --cuda-graphs, then resumed by a run without it, then with it again
        assert main(train_args(tiny_model, data, graphed, *common, "--cuda-graphs", "--max-steps", "3",
                               "--save-every", "1")) == 0
        assert main(train_args(tiny_model, data, graphed, *common, "--max-steps", "5", "--save-every", "1",
                               "--resume", "--cuda-graphs", "off")) == 0
        assert main(train_args(tiny_model, data, graphed, *common, "--cuda-graphs", "--resume")) == 0
    else:
        assert main(train_args(tiny_model, data, graphed, *common, "--cuda-graphs")) == 0
    want, got = losses(tmp_path / "plain"), losses(graphed)
    assert len(want) == len(got) == 7  # 32 records: 6 batches of 5, then a short one of 2
    assert got == pytest.approx(want, rel=1e-4 if device == "cpu" else 2e-3)
    assert got[-1] < got[0]
    full = [t for b, t in plain_shapes if b == 5]
    lengths = graph_lengths(full, max(t for _, t in plain_shapes), most=2)  # (7 steps: the fewest graphs)
    assert len(full) == 6 and len(lengths) >= 2
    if resume:
        return
    # (on a GPU the forward hook sees each graph's warm-up and capture, not its replays)
    assert {b for b, _ in shapes} == {2, 5} and sum(b == 2 for b, _ in shapes) == 1
    padded = [t for b, t in shapes if b == 5]
    fits = [next(n for n in lengths if n >= t) for t in full]  # the shorter batches take the shorter graphs
    assert set(padded) == set(fits) and (device == "cuda" or padded == fits)
    short = [t for b, t in shapes if b == 2]
    assert short == [t for b, t in plain_shapes if b == 2]  # the short batch ran eagerly, unpadded


def test_cuda_graphs_with_grad_accum_trains_as_the_plain_loop(tiny_model, tmp_path):
    """--grad-accum 2 with graphs: a graph adds each full micro-batch's gradients, one more steps; a short
    micro-batch runs eagerly into the same gradients. Off CUDA the same loop runs eagerly on padded batches."""
    data = _varied_sft_file(tmp_path / "varied.jsonl")
    common = ["--epochs", "1", "--batch-size", "6", "--grad-accum", "2", "--dropout", "0", "--eval-generate",
              "false", "--precision", "fp32", "--max-grad-norm", "0.5", "--schedule", "constant"]
    assert main(train_args(tiny_model, data, tmp_path / "plain", *common, "--cuda-graphs", "off")) == 0
    assert main(train_args(tiny_model, data, tmp_path / "graphed", *common, "--cuda-graphs")) == 0
    want, got = losses(tmp_path / "plain"), losses(tmp_path / "graphed")
    assert len(want) == len(got) == 3  # 32 records: 5 batches of 6 and one of 2, in pairs (the short one too)
    assert got == pytest.approx(want, rel=1e-4 if not torch.cuda.is_available() else 2e-3)
    assert got[-1] < got[0]


def test_cuda_graphs_switch_auto_on_off():
    from lorakit.cli import build_parser, resolve_config
    from lorakit.train import TrainConfig

    def mode(*flags):
        return resolve_config(build_parser().parse_args(["train", *flags]), ("train",))["train"].validate().cuda_graphs

    assert mode() == "auto" and mode("--cuda-graphs") == "on" and mode("--cuda-graphs", "off") == "off"
    assert mode("--cuda-graphs", "false") == "off" and TrainConfig(cuda_graphs=True).validate().cuda_graphs == "on"
    with pytest.raises(lk.ConfigError, match="auto, on or off"):
        TrainConfig(cuda_graphs="sometimes").validate()
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert TrainConfig().validate().graphs_for(gpu, False)[0]
    assert TrainConfig(grad_accum=4).validate().graphs_for(gpu, False)[0]  # micro-batch graphs + an update graph
    assert TrainConfig(gradient_checkpointing=True).validate().graphs_for(gpu, False)[0]
    for cfg, dist, why in ((TrainConfig(), False, "no CUDA"),
                           (TrainConfig(full=True), False, "--full"), (TrainConfig(), True, "several processes"),
                           (TrainConfig(cuda_graphs="off"), False, "off")):
        on, text = cfg.validate().graphs_for(cpu if why == "no CUDA" else gpu, dist)
        assert not on and why in text, (why, text)


def test_cuda_graphs_auto_falls_back_to_eager_steps_when_a_capture_fails(tiny_model, tmp_path, monkeypatch, capsys):
    import lorakit.train as train_mod

    data = _varied_sft_file(tmp_path / "varied.jsonl")
    common = ["--epochs", "1", "--batch-size", "5", "--dropout", "0", "--eval-generate", "false",
              "--precision", "fp32", "--schedule", "constant"]
    assert main(train_args(tiny_model, data, tmp_path / "plain", *common, "--cuda-graphs", "off")) == 0
    # as on a GPU whose first capture fails: auto goes on eagerly, on (asked for) stops with the error
    monkeypatch.setattr(train_mod.TrainConfig, "graphs_for", lambda self, device, dist: (True, "on"))
    tries = []

    def failing(self, batch):
        tries.append(1)
        raise lk.GraphError("graphed_step: the step could not be captured as a CUDA graph (test).")

    monkeypatch.setattr(train_mod.GraphSteps, "step", failing)
    capsys.readouterr()
    assert main(train_args(tiny_model, data, tmp_path / "auto", *common)) == 0
    assert "CUDA graphs off for the rest of the run" in capsys.readouterr().out and len(tries) == 1
    assert losses(tmp_path / "auto") == pytest.approx(losses(tmp_path / "plain"), rel=1e-4)
    assert main(train_args(tiny_model, data, tmp_path / "on", *common, "--cuda-graphs")) != 0
    assert "could not be captured" in capsys.readouterr().err


def test_cuda_graphs_with_gradient_checkpointing_trains_as_the_plain_loop(tiny_model, tmp_path):
    """Gradient checkpointing replays its recomputation inside the captured step (and its dropout masks:
    tests/test_graphs.py checks that on a GPU); off CUDA the same padded loop runs eagerly."""
    data = _varied_sft_file(tmp_path / "varied.jsonl")
    common = ["--epochs", "1", "--batch-size", "5", "--dropout", "0", "--eval-generate", "false",
              "--precision", "fp32", "--schedule", "constant", "--gradient-checkpointing"]
    assert main(train_args(tiny_model, data, tmp_path / "plain", *common, "--cuda-graphs", "off")) == 0
    assert main(train_args(tiny_model, data, tmp_path / "graphed", *common, "--cuda-graphs")) == 0
    want, got = losses(tmp_path / "plain"), losses(tmp_path / "graphed")
    assert len(got) == 7 and got == pytest.approx(want, rel=1e-4 if not torch.cuda.is_available() else 2e-3)


def test_graph_lengths_follow_the_batches_and_hold_every_batch():
    from lorakit.data import PadCollator
    from lorakit.train import graph_lengths

    # quantiles of the batches' longest examples (rounded up to 8), then the longest example
    assert graph_lengths([10, 20, 30, 40, 50, 60, 70, 80], 80, most=4) == [24, 40, 64, 80]
    assert graph_lengths([5, 6, 7], 300) == [8, 304]  # the longest example sits in no full batch
    assert graph_lengths([], 6) == [8]
    gen = torch.Generator().manual_seed(0)
    for shape in ("skewed", "uniform"):
        raw = torch.randint(20, 2000, (500,), generator=gen)
        batch_longest = (raw ** 2 // 2000 + 20 if shape == "skewed" else raw).tolist()
        lengths = graph_lengths(batch_longest, 2100)
        assert len(lengths) <= 9 and lengths == sorted(set(lengths)) and lengths[-1] == 2104
        assert all(n % 8 == 0 for n in lengths)
        fits = [next(w for w in lengths if w >= n) for n in batch_longest]
        per_length = [fits.count(w) for w in lengths]
        assert max(per_length) <= -(-len(batch_longest) // 8) + 8, per_length  # about an eighth of the batches each
        # less padding than powers of two from 64 (what a data-blind choice of as many graphs gives)
        pow2 = [64, 128, 256, 512, 1024, 2048, 2104]
        waste = sum(f - n for f, n in zip(fits, batch_longest))
        assert waste < sum(next(w for w in pow2 if w >= n) - n for n in batch_longest), shape
    batch = PadCollator(0)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], pad_to=8)
    assert batch["input_ids"].shape == (1, 8) and batch["labels"][0, 3:].eq(-100).all()
    with pytest.raises(lk.ConfigError, match="shorter than the longest"):
        PadCollator(0)([{"input_ids": [1, 2, 3]}], pad_to=2)


def test_eval_resolves_settings_as_train_and_says_what_it_scores(tiny_model, sft_file, tmp_path, capsys):
    out = tmp_path / "run"
    # max_length 5 cuts the EOS off each 6-token example: the run's setting, not a default nor the demo's 32
    assert main(train_args(tiny_model, sft_file, out, "--max-steps", "2", "--eval-generate", "false",
                           "--max-length", "5", "--eval-file", str(sft_file))) == 0
    capsys.readouterr()
    assert main(["eval", "--config", str(out / "run_config.yaml"), "--adapter", str(out / "adapter")]) == 0
    printed = capsys.readouterr()
    assert "scoring 32 of 32 examples" in printed.err and "32 truncated to --max-length 5" in printed.err
    result = json.loads(printed.out)  # (stdout: the JSON result alone)
    assert result["examples_scored"] == 32 and result["examples_truncated"] == 32 and result["examples_dropped"] == 0
    # flags over --config
    assert main(["eval", "--config", str(out / "run_config.yaml"), "--max-length", "64",
                 "--max-eval-examples", "5"]) == 0
    text = capsys.readouterr().err
    assert "scoring 5 of 32 examples" in text and "0 truncated" in text and "(no adapter)" in text
    # no data: a refusal that says how to ask, not the demo task's examples and settings
    cli_fails_cleanly(capsys, ["eval", "--model", str(tiny_model)], "--eval-file", "--builtin-task")
    cli_fails_cleanly(capsys, ["eval", "--model", str(tiny_model), "--eval-file", str(sft_file), "--adapter",
                               f"a={out / 'adapter'}", "--adapter", f"b={out / 'best'}"], "one adapter at a time")


def test_metric_for_best_picks_best_and_headline(tiny_model, sft_file, tmp_path, capsys):
    from lorakit.train import TrainConfig, metric_key
    from lorakit.train.evaluation import official_metric
    result = {"loss": 0.4, "accuracy": 0.69, "f1": 0.8, "mcc": 0.0}
    assert metric_key(result, TrainConfig(metric_for_best="mcc"), "classification") == ("mcc", True)
    assert metric_key(result, TrainConfig(metric_for_best="loss"), "classification") == ("loss", False)
    assert metric_key(result, TrainConfig(metric_for_best="f1", greater_is_better=False))[1] is False
    assert metric_key(result, TrainConfig(eval_file="glue/CoLA/dev.tsv"), "classification") == ("mcc", True)
    assert metric_key(result, TrainConfig(eval_file="glue/SST-2/dev.tsv"), "classification") == ("accuracy", True)
    assert official_metric("regression", "data/STS-B/dev.tsv") == "pearson"
    assert official_metric("classification", "MRPC/dev.tsv") == official_metric("classification", "qqp.tsv") == "f1"
    with pytest.raises(lk.ConfigError, match="accuracy, f1, mcc"):
        metric_key(result | {"loss": 1.0}, TrainConfig(metric_for_best="bleu"))

    out = tmp_path / "best"
    assert main(train_args(tiny_model, sft_file, out, "--max-steps", "2", "--eval-every", "1", "--save-every", "2",
                           "--eval-file", str(sft_file), "--eval-generate", "false",
                           "--metric-for-best", "perplexity")) == 0
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    assert progress["best"]["metric"] == "perplexity"
    assert "perplexity: before" in capsys.readouterr().out
    # a metric the task never reports: refused before anything loads or is written
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, tmp_path / "no", "--metric-for-best", "mcc"),
                      "--metric-for-best mcc", "loss, perplexity")
    assert not (tmp_path / "no").exists()


def test_classifier_collapsed_to_one_class_warns():
    from types import SimpleNamespace

    from lorakit.data import DataConfig, DataStats
    from lorakit.train import RunConfig, Split, TrainConfig, evaluate
    from lorakit.train.evaluation import CollapsedPredictions

    class Constant(torch.nn.Module):  # logits (batch, 2) that always favour class 1
        def forward(self, input_ids, attention_mask=None, labels=None):
            return SimpleNamespace(logits=torch.tensor([[0.0, 1.0]]).expand(len(input_ids), 2))

    examples = [{"input_ids": [5, 6], "labels": i % 2} for i in range(6)]
    split = Split([{}] * 6, examples, DataStats(label_names=["neg", "pos"]))
    run_cfg = RunConfig(TrainConfig(batch_size=4), DataConfig(task="classification"))
    with pytest.warns(CollapsedPredictions, match="class 'pos'.*mcc 0.000"):
        result = evaluate(Constant(), SimpleNamespace(pad_token_id=0), split, run_cfg, torch.device("cpu"))
    assert result["accuracy"] == 0.5


def test_config_values_are_checked_as_data_with_flags_and_files(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1e-3\nmax_steps: 10\nlora:\n  alpha: 32\n")  # PyYAML reads 1e-3 as text
    parts = resolve_config(build_parser().parse_args(["train", "--config", str(cfg), "--train-file", "x.jsonl"]))
    assert parts["train"].lr == 0.001 and isinstance(parts["lora"].alpha, float)
    for text, words in (("lr: fast\n", ("--lr", "`lr:`", str(cfg), "a number", "'fast'")),
                        ("max_steps: ten\n", ("--max-steps", "`max_steps:`", "whole number")),
                        ("data:\n  max_length: [1]\n", ("--max-length", "whole number"))):
        cfg.write_text(text)
        # (before the model: an unknown model name would be the error otherwise)
        cli_fails_cleanly(capsys, ["train", "--config", str(cfg), "--model", "no-such-model"], *words)
    cli_fails_cleanly(capsys, ["train", "--dropout", "2", "--model", "no-such-model"], "--dropout must be")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--lr", "abc"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --lr: expected a number, got 'abc'" in err
    assert "<lambda>" not in err and len(err.strip().splitlines()) == 2
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"lorakit {lk.__version__}"


def test_help_lists_what_applies_and_explains_every_flag():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and not action.help.startswith("(default"), (name, action.option_strings)
    for name in ("eval", "generate"):
        flags = {f for a in commands[name]._actions for f in a.option_strings}
        assert not flags & {"--lr", "--output-dir", "--resume", "--epochs", "--r", "--targets", "--warmup-ratio",
                            "--packing"}
    assert "--metric-for-best" in {f for a in commands["train"]._actions for f in a.option_strings}


def test_errors_name_flags_and_two_adapters_are_not_summed_silently(tiny_model, sft_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    err = cli_fails_cleanly(capsys, train_args(tiny_model, bad, tmp_path / "o", "--max-steps", "1"),
                            "--prompt-column")
    assert "DataConfig" not in err and "prompt_column" not in err
    model, _ = load_tiny(tiny_model)
    for name in ("a", "b"):
        lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj"]), name=name)
        lk.save_adapter(model, tmp_path / name, name=name)
    assert main(["generate", "--model", str(tiny_model), "--adapter", f"a={tmp_path / 'a'}",
                 "--adapter", f"b={tmp_path / 'b'}", "--prompt", "Hi", "--max-new-tokens", "1"]) == 0
    assert "2 adapters (a, b) and no --route" in capsys.readouterr().err
    cli_fails_cleanly(capsys, ["generate", "--model", str(tiny_model), "--adapter", str(tmp_path / "a"),
                               "--adapter", str(tmp_path / "b"), "--prompt", "Hi"], "share the name 'default'")


def load_tiny(path):
    from lorakit.models import load_model
    return load_model(str(path))


def test_label_smoothing_is_the_smoothed_cross_entropy_of_the_next_token():
    from models import llama

    from lorakit.train.steppers import training_loss

    model = llama().double()
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt the loss skips
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert training_loss(model, batch, 0.0) == model(**batch).loss
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    target, keep = labels[:, 1:], labels[:, 1:] != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    uniform = -logp.mean(-1)
    want = ((0.9 * nll + 0.1 * uniform) * keep).sum() / keep.sum()
    torch.testing.assert_close(training_loss(model, batch, 0.1).double(), want, rtol=1e-6, atol=1e-6)


def test_train_with_label_smoothing_and_its_refusal(tiny_model, sft_file, tmp_path, capsys):
    assert main(train_args(tiny_model, sft_file, tmp_path / "ls", "--label-smoothing", "0.1", "--max-steps", "2")) == 0
    import yaml
    saved = yaml.safe_load((tmp_path / "ls" / "run_config.yaml").read_text())
    assert saved["train"]["label_smoothing"] == 0.1
    cli_fails_cleanly(capsys, train_args(tiny_model, sft_file, tmp_path / "bad", "--label-smoothing", "1.0"),
                      "--label-smoothing")
