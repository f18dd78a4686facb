"""Under transformers' Trainer, how fast is lorakit, against PEFT and the frozen floor? ms/step and peak memory.

bench_train.py's setup (a random-init Llama-shaped model, 1.1B: hidden 2048, 22 layers, GQA 32/4, MLP 5632,
vocab 32000; bf16 weights, batch 8 x 1024, LoRA r=16 alpha=32 on all linears, dropout 0.05), trained by a plain
`transformers.Trainer` (its default AdamW, gradient clipping at 1.0, a linear schedule, no checkpoints):

  floor            bench_train's eager frozen floor: forward + backward through the frozen model, no Trainer,
                   no optimizer (what any LoRA must pay)
  trainer-lorakit  lk.inject(model, cfg); lk.fuse(model); Trainer(model=model, ...).train()
  trainer-lorakit-unfused   the same without lk.fuse
  trainer-peft     peft.get_peft_model(model, LoraConfig(...)); Trainer(model=model, ...).train()

--compile: TrainingArguments(torch_compile=True) for the Trainer cases and torch.compile for the floor.
--liger: Liger's fused kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy; needs CUDA and
liger-kernel) applied to the Llama classes before the model is built, for every case, floor included.
A step is timed from one Trainer step's start to the next (the data loader, forward, backward, clipping,
optimizer and scheduler: what a user waits for); the peak is torch.cuda.max_memory_allocated after warm-up.

    PYTHONPATH=src python benchmarks/bench_trainer.py [--compile] [--liger] [--cases floor,trainer-lorakit]
    PYTHONPATH=src python benchmarks/bench_trainer.py --tiny      # a small CPU run of every case
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402 (the model shapes, model builder and the floor's timing)

CASES = ["floor", "trainer-lorakit", "trainer-lorakit-unfused", "trainer-peft"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, batch=2, seq=32)


class Batches(torch.utils.data.Dataset):
    """The same `n` sequences, each its own labels."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def step_timer(warmup: int):
    """A TrainerCallback that times each step from its start to the next one's (and to the end of training)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def _mark(self) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.starts.append(time.perf_counter())
            if len(self.starts) == warmup + 1 and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            self._mark()

        def on_train_end(self, args, state, control, **kwargs):
            self._mark()

        def times_ms(self) -> list[float]:
            return [(b - a) * 1e3 for a, b in zip(self.starts[warmup:], self.starts[warmup + 1:])]

    return StepTimer()


def adapt(case: str, model, r: int, alpha: float):
    if case.startswith("trainer-peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05,
                                                           target_modules="all-linear"))
        return model, f"peft {peft.__version__}"
    import lorakit as lk

    lk.inject(model, lk.LoraConfig(r=r, alpha=alpha, dropout=0.05, targets="all-linear"))
    if case == "trainer-lorakit":
        lk.fuse(model)
    return model, "lk.inject" + (" + lk.fuse" if case == "trainer-lorakit" else "")


def run_trainer_case(case: str, args, shape: dict) -> dict:
    import transformers

    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    model = bench_train.build(shape, args.layers, args.device, getattr(torch, args.dtype))
    model, note = adapt(case, model, args.rank, args.alpha)
    bench_train.randomize_lora_B(model)
    g = torch.Generator().manual_seed(2)
    n = shape["batch"] * (args.warmup + args.steps)
    data = Batches(torch.randint(0, shape["vocab_size"], (n, shape["seq"]), generator=g))
    timer = step_timer(args.warmup)
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            out, per_device_train_batch_size=shape["batch"], max_steps=args.warmup + args.steps, learning_rate=1e-4,
            save_strategy="no", report_to=[], logging_steps=10**6, disable_tqdm=True, use_cpu=args.device == "cpu",
            torch_compile=args.compile, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=data, callbacks=[timer])
        trainer.train()
    times = timer.times_ms()
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = model = None
    gc.collect()
    return dict(case=case, ms=statistics.median(times), ms_min=min(times), ms_max=max(times), peak_gib=peak,
                trainable=n_train, note=note + (", torch_compile" if args.compile else ""))


def run_floor(args, shape: dict) -> dict:
    floor_args = argparse.Namespace(device=args.device, layers=args.layers, dtype=args.dtype, attn="sdpa",
                                    rank=args.rank, alpha=args.alpha, compile=args.compile, graphs=False,
                                    warmup=args.warmup, steps=args.steps, profile="", cprofile="", profile_top=0)
    row = bench_train.run_case("floor", floor_args, shape)
    return dict(case="floor", ms=row["ms"], ms_min=row["ms_min"], ms_max=row["ms_max"], peak_gib=row["peak_gib"],
                trainable=0, note="eager loop, bench_train" + (", torch.compile" if args.compile else ""))


def apply_liger() -> str:
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    import liger_kernel

    apply_liger_kernel_to_llama()  # patches transformers' Llama classes: every model built after this uses them
    return getattr(liger_kernel, "__version__", "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--compile", action="store_true", help="torch_compile=True (floor: torch.compile)")
    ap.add_argument("--liger", action="store_true", help="Liger's kernels on the Llama classes (CUDA)")
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU, float32, 3 steps: a smoke run")
    args = ap.parse_args()
    if args.tiny:
        shape, args.device, args.dtype = dict(TINY), "cpu", "float32"
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    else:
        shape = dict(bench_train.SHAPES["1b"])
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    liger = apply_liger() if args.liger else "off"

    import peft
    import transformers

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    layers = args.layers or shape["num_hidden_layers"]
    print(f"# bench_trainer: {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, peft "
          f"{peft.__version__}, liger {liger}; {'tiny' if args.tiny else '1.1B'} shape ({layers} layers), batch "
          f"{shape['batch']}x{shape['seq']}, {args.dtype}, r={args.rank} alpha={args.alpha:g} all-linear dropout "
          f"0.05, torch_compile {args.compile}; median of {args.steps} steps after {args.warmup} warm-up", flush=True)
    rows = []
    for case in args.cases.split(","):
        try:
            row = run_floor(args, shape) if case == "floor" else run_trainer_case(case, args, shape)
        except Exception as e:  # one broken case must not lose the others' numbers
            row = dict(case=case, ms=float("nan"), ms_min=float("nan"), ms_max=float("nan"), peak_gib=float("nan"),
                       trainable=0, note=f"FAILED: {type(e).__name__}: {str(e)[:160]}")
            gc.collect()
        rows.append(row)
        print(f"  {row['case']:<24} {row['ms']:8.1f} ms  {row['peak_gib']:6.2f} GiB  {row['note']}", flush=True)
    floor = next((r for r in rows if r["case"] == "floor"), None)
    peft_row = next((r for r in rows if r["case"] == "trainer-peft"), None)
    print(f"\n{'case':<24} {'ms/step':>8} {'(min-max)':>15} {'peak GiB':>9} {'x floor':>8} {'GiB/floor':>10} "
          f"{'PEFT ms / ms':>13} {'trainable':>12}  note")
    for r in rows:
        xf = r["ms"] / floor["ms"] if floor else float("nan")
        mf = r["peak_gib"] / floor["peak_gib"] if floor else float("nan")
        speed = peft_row["ms"] / r["ms"] if peft_row else float("nan")
        print(f"{r['case']:<24} {r['ms']:8.1f} {r['ms_min']:7.1f}-{r['ms_max']:<7.1f} {r['peak_gib']:9.2f} {xf:8.3f} "
              f"{mf:10.3f} {speed:13.2f} {r['trainable']:12,d}  {r['note']}")


if __name__ == "__main__":
    main()
