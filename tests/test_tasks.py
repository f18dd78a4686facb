"""Contracts of lorakit.tasks: the built-in date-normalization task and its metric."""

from __future__ import annotations

import datetime
import re

import pytest

from lorakit.errors import ConfigError
from lorakit.tasks import DEFAULT_HPARAMS, builtin_task, normalize_prediction, score

ISO = re.compile(r"^ (\d{4})-(\d{2})-(\d{2})\n$")


def test_same_seed_same_records():
    assert builtin_task(200, 50, seed=3) == builtin_task(200, 50, seed=3)


def test_pinned_records():
    """Records are a pure function of the seed, on every platform and Python version."""
    train, held_out = builtin_task(2, 2, seed=0)
    assert train == [{"prompt": "Date: 27 June 2006\nISO:", "completion": " 2006-06-27\n"},
                     {"prompt": "Date: 30 Aug 1931\nISO:", "completion": " 1931-08-30\n"}]
    assert held_out == [{"prompt": "Date: August 22, 1946\nISO:", "completion": " 1946-08-22\n"},
                        {"prompt": "Date: Mar 10, 1919\nISO:", "completion": " 1919-03-10\n"}]


def test_other_seed_other_records():
    assert builtin_task(50, 20, seed=0) != builtin_task(50, 20, seed=1)


def test_held_out_set_does_not_depend_on_train_size():
    assert builtin_task(10, 30, seed=0)[1] == builtin_task(500, 30, seed=0)[1]


def test_train_and_held_out_are_disjoint_and_unique():
    train, held_out = builtin_task(3000, 500, seed=0)
    assert len(train) == 3000 and len(held_out) == 500
    train_prompts = {r["prompt"] for r in train}
    held_prompts = {r["prompt"] for r in held_out}
    assert len(train_prompts) == 3000 and len(held_prompts) == 500
    assert not train_prompts & held_prompts


def test_completions_are_the_right_iso_dates():
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
    train, _ = builtin_task(2000, 0, seed=7)
    forms = set()
    for rec in train:
        text = rec["prompt"].removeprefix("Date: ").removesuffix("\nISO:")
        year, month, day = (int(g) for g in ISO.match(rec["completion"]).groups())
        datetime.date(year, month, day)  # a real calendar date (29 Feb only in leap years)
        name = months[month - 1]
        written = {f"{day} {name} {year}": 0, f"{name} {day}, {year}": 1,
                   f"{day} {name[:3]} {year}": 2, f"{name[:3]} {day}, {year}": 3}
        assert text in written, (text, rec["completion"])
        forms.add(written[text])
    assert forms == {0, 1, 2, 3}


def test_size_limits():
    assert builtin_task(0, 0) == ([], [])
    with pytest.raises(ConfigError):
        builtin_task(-1, 5)
    with pytest.raises(ConfigError):
        builtin_task(10**7, 5)


def test_score_exact_match():
    refs = [" 2024-03-07\n", " 1999-12-31\n", " 1900-01-01\n", " 2000-02-29\n"]
    assert score(refs, refs) == 1.0
    assert score([" 2024-03-07", "1999-12-31\n\nmore text", "1900-1-1", ""], refs) == 0.5
    assert score(["x", "y", "z", "w"], refs) == 0.0
    assert score([], []) == 0.0


def test_score_uses_only_the_first_line():
    assert normalize_prediction("  2024-03-07  \n2024-03-08") == "2024-03-07"
    # A blank first line is an empty answer, as when generation stops at the first newline.
    assert score(["\n2024-03-07"], [" 2024-03-07\n"]) == 0.0


def test_score_length_mismatch():
    with pytest.raises(ConfigError, match="pair up"):
        score(["a"], ["a", "b"])


def test_default_hparams_are_consistent():
    h = DEFAULT_HPARAMS
    assert h["model"] == "smollm2-135m"
    assert h["n_train"] >= h["steps"] * h["batch_size"]
    assert 0 < h["lr"] < 1 and h["r"] > 0 and h["alpha"] > 0 and h["n_eval"] > 0
    train, held_out = builtin_task(500, 50)
    # Every completion is " YYYY-MM-DD\n": 12 characters, 12 tokens in SmolLM2's tokenizer (digits
    # are single tokens), which max_new_tokens must cover.
    assert {len(r["completion"]) for r in train + held_out} == {12}
    assert h["max_new_tokens"] >= 12
