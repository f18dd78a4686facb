r"""The built-in task that ``lorakit train`` runs with no arguments: date normalization.

Each record turns a date written in words into ISO 8601::

    prompt:     "Date: March 7, 2024\nISO:"
    completion: " 2024-03-07\n"

Dates come in four surface forms ("7 March 2024", "March 7, 2024", "7 Mar 2024",
"Mar 7, 2024"), years 1900-2099, every valid day. The model must map month names to
numbers, zero-pad the day and month, and reorder; SmolLM2-135M-Instruct gets none right
zero-shot with this prompt, and learns it from about 200 examples. Records are plain text,
not chat-formatted: the chat template adds a ~25-token system prompt to a ~27-token record,
which would double the cost of every step on a CPU without making the task easier to learn.

How to train and evaluate it (what ``benchmarks/default_task_probe.py`` does):
- tokens = prompt + completion + EOS, loss on the completion and EOS only; a record is
  26-28 SmolLM2 tokens. The completion ends in a newline, so the metric does not depend on
  whether a trainer appends EOS; appending it lets generation stop by itself.
- evaluate with greedy decoding, left padding, ``max_new_tokens`` from `DEFAULT_HPARAMS`,
  stopping at the first newline (``stop_strings=["\n"]``); all held-out prompts fit in one
  batch, which on a CPU costs little more than one prompt since decoding is bound by
  reading the weights.
- the metric is `score`: exact match of the first line of each generated text.

Measured (``python benchmarks/default_task_probe.py``, `DEFAULT_HPARAMS`, peft 0.21.2 as the
LoRA implementation, torch 2.13.0+cpu, float32, 2-core AMD EPYC VM with AVX2, 24 GiB)::

    | phase                          | wall s | CPU s | result                      |
    |--------------------------------|--------|-------|-----------------------------|
    | load smollm2-135m (cached)     |    1.0 |   1.0 |                             |
    | eval before, 100 held-out      |   27.0 |  26.4 | exact match 0.000 (0/100)   |
    | train 40 steps x 8 records     |  265.2 | 249.9 | loss 2.529 -> 0.003         |
    | eval after, same 100           |   41.0 |  31.5 | exact match 1.000 (100/100) |
    | whole job, imports included    |  344.1 | 318.1 |                             |

- 1 thread (``--threads 1``): other processes kept the load average at 3.5-5.5 on the two
  cores, and two OpenMP threads then lose most of their time waiting for each other (a
  forward + backward of 16 x 24 tokens: 7.7 s with 1 thread, 48-69 s with 2). On an idle
  machine wall time is at most the CPU time above. Median step: 6.1 s wall, 5.9 CPU-s
  (8 records, ~27 tokens each); forward and backward take about the same time.
- the first run also converts the GGUF file once: +49 s wall (43 CPU-s), so a first
  ``lorakit train`` is about 6.6 minutes here, later ones about 5.7.
- another seed (``--seed 1``, other records and other LoRA init): 0.960 after training
  (96/100; train 238.6 CPU-s, whole job 280.9 CPU-s without the evaluation before); the 4
  misses are single-digit days not zero-padded ("1995-04-2-2", "1985-02-1").
- the loss is below 0.01 by step 20 (160 records); 60 steps of 8 with the same settings
  (seed 0, all-linear) also gave 0.000 -> 1.000 on 64 held-out records, in 385 CPU-s.
- zero-shot, other prompts do not rescue the base model (32 records of the first form):
  "28 October 1967 =>" gets 6%, a chat-formatted instruction ("Convert the date to ISO 8601
  (YYYY-MM-DD): 28 October 1967") 9%.
"""

from __future__ import annotations

import calendar
import random
from collections.abc import Sequence
from typing import TypedDict

from lorakit.errors import ConfigError

__all__ = ["Record", "DEFAULT_HPARAMS", "builtin_task", "normalize_prediction", "score"]


class Record(TypedDict):
    """One prompt-completion pair: the model sees `prompt` and learns to write `completion`."""

    prompt: str
    completion: str


_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]  # fixed, so that records never depend on the locale
_FIRST_YEAR, _LAST_YEAR = 1900, 2099

DEFAULT_HPARAMS: dict[str, object] = {
    "model": "smollm2-135m",
    "r": 8,
    "alpha": 16,
    "dropout": 0.0,
    "targets": "all-linear",  # q,k,v,o,gate,up,down of every layer (not lm_head)
    "optimizer": "adamw",  # torch.optim.AdamW, default betas and eps
    "lr": 2e-3,
    "weight_decay": 0.0,
    "warmup_steps": 5,
    "schedule": "linear",  # linear warmup, then linear decay to 0 at the last step
    "steps": 40,
    "batch_size": 8,
    "max_length": 32,  # tokens of prompt + completion + EOS; records have 26-28
    "max_new_tokens": 12,  # " YYYY-MM-DD\n" is 12 tokens (digits are single tokens)
    "n_train": 40 * 8,  # every training record is seen once
    "n_eval": 100,
    "seed": 0,
}
"""Settings that take the default job from 0% to 100% exact match in under 6 minutes on a
2-core CPU (module docstring). The keys name LoRA settings (`r`, `alpha`, `dropout`,
`targets`), optimization (`optimizer`, `lr`, `weight_decay`, `warmup_steps`, `schedule`,
`steps`, `batch_size`), data (`n_train`, `n_eval`, `seed` for `builtin_task`, `max_length`)
and evaluation (`max_new_tokens`, greedy)."""


def _render(day: int, month: int, year: int, form: int) -> str:
    name = _MONTHS[month - 1]
    if form == 0:
        return f"{day} {name} {year}"
    if form == 1:
        return f"{name} {day}, {year}"
    if form == 2:
        return f"{day} {name[:3]} {year}"
    return f"{name[:3]} {day}, {year}"


def _record(rng: random.Random) -> Record:
    year = rng.randint(_FIRST_YEAR, _LAST_YEAR)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    text = _render(day, month, year, form=rng.randrange(4))
    return {"prompt": f"Date: {text}\nISO:", "completion": f" {year:04d}-{month:02d}-{day:02d}\n"}


def builtin_task(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Generate the date-normalization task: `n_train` training and `n_eval` held-out records.

    Deterministic: the same arguments give the same records on every platform (only
    `random.Random(seed)` and fixed English month names are used). Every prompt is unique
    and no held-out prompt occurs in the training records. The held-out set depends only on
    `n_eval` and `seed`, not on `n_train`, so evaluations with different training sizes
    compare on the same examples.

    Raises:
        ConfigError: `n_train` or `n_eval` is negative, or together exceed the number of
            distinct prompts the generator can produce (about 290,000).
    """
    if n_train < 0 or n_eval < 0:
        raise ConfigError(f"n_train and n_eval must be >= 0, got n_train={n_train}, n_eval={n_eval}")
    capacity = 4 * (_LAST_YEAR - _FIRST_YEAR + 1) * 365
    if n_train + n_eval > capacity // 2:  # far below the limit, rejection sampling stays fast
        raise ConfigError(f"n_train + n_eval = {n_train + n_eval} is too large; "
                          f"at most {capacity // 2} distinct records")
    # Held-out records come first from their own stream, then training records from another
    # stream skip every held-out prompt: so eval is fixed by (n_eval, seed) and disjoint.
    eval_rng, train_rng = random.Random(f"{seed}:eval"), random.Random(f"{seed}:train")
    seen: set[str] = set()

    def draw(rng: random.Random, n: int) -> list[Record]:
        out: list[Record] = []
        while len(out) < n:
            rec = _record(rng)
            if rec["prompt"] not in seen:
                seen.add(rec["prompt"])
                out.append(rec)
        return out

    eval_records = draw(eval_rng, n_eval)
    return draw(train_rng, n_train), eval_records


def normalize_prediction(text: str) -> str:
    """The part of a generated text that `score` compares: its first line, stripped."""
    return text.split("\n", 1)[0].strip()


def score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact-match accuracy in [0, 1] of `predictions` against `references`.

    Both sides are reduced with `normalize_prediction` (first line, surrounding whitespace
    removed), so a reference may be a record's completion (" 2024-03-07\\n") and a prediction
    may run on after its first line. An empty list scores 0.0.

    Raises:
        ConfigError: the two sequences differ in length.
    """
    if len(predictions) != len(references):
        raise ConfigError(f"{len(predictions)} predictions for {len(references)} references; they must pair up")
    if not references:
        return 0.0
    hits = sum(normalize_prediction(p) == normalize_prediction(r) for p, r in zip(predictions, references))
    return hits / len(references)
