"""Metric contracts: hand-checkable values, agreement with the libraries and with the E2E scorer's mteval."""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from lorakit.eval import metrics
from lorakit.data import load_records
from lorakit.errors import ConfigError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no Java runtime")


# ----------------------------------------------------------------------------- classification


def test_binary_scores_by_hand():
    # TP = 2 (items 0, 3), FP = 2 (2, 5), FN = 0, TN = 2 (1, 4)
    pred = [1, 0, 1, 1, 0, 1]
    gold = [1, 0, 0, 1, 0, 0]
    assert metrics.accuracy(pred, gold) == pytest.approx(4 / 6)
    assert metrics.f1(pred, gold) == pytest.approx(2 / 3)  # precision 1/2, recall 1
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 4 / sqrt(4*2*4*2)
    assert metrics.matthews(pred, gold) == pytest.approx(0.5)
    assert metrics.classification_scores(pred, gold) == pytest.approx(
        {"accuracy": 4 / 6, "f1": 2 / 3, "mcc": 0.5}
    )


def test_multiclass_against_sklearn():
    from sklearn.metrics import f1_score, matthews_corrcoef

    pred = [0, 1, 2, 2, 1, 0, 2, 1]
    gold = [0, 2, 2, 1, 1, 0, 2, 0]
    assert metrics.f1(pred, gold, average="macro") == pytest.approx(
        f1_score(gold, pred, average="macro")
    )
    scores = metrics.classification_scores(pred, gold)
    assert scores["f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert scores["mcc"] == pytest.approx(matthews_corrcoef(gold, pred))


def test_tensor_inputs_and_errors():
    import torch

    assert metrics.accuracy(torch.tensor([1, 0]), torch.tensor([1, 1])) == 0.5
    with pytest.raises(ConfigError, match="3 predictions for 2 labels"):
        metrics.accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ConfigError, match="'binary' or 'macro'"):
        metrics.f1([1], [1], average="micro")


def test_correlations():
    from scipy.stats import pearsonr

    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert metrics.pearson(x, [2 * v for v in x]) == pytest.approx(1.0)
    # Spearman = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 120
    assert metrics.spearman(x, [1, 2, 3, 5, 4]) == pytest.approx(0.9)
    y = [1.3, 0.2, 3.9, 2.2, 5.0]
    assert metrics.pearson(x, y) == pytest.approx(pearsonr(x, y)[0])
    assert math.isnan(metrics.pearson(x, [1.0] * 5))
    r = metrics.regression_scores(x, y)
    assert r["corr"] == pytest.approx((r["pearson"] + r["spearman"]) / 2)
    with pytest.raises(ConfigError, match="at least 2"):
        metrics.spearman([1.0], [1.0])


def test_perplexity():
    assert metrics.perplexity(math.log(10)) == pytest.approx(10)
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(1e4) == math.inf
    with pytest.raises(ConfigError, match="mean cross-entropy >= 0"):
        metrics.perplexity(float("nan"))
    with pytest.raises(ConfigError, match="got -1"):
        metrics.perplexity(-1.0)


# ----------------------------------------------------------------------------- generation

HYPS = [
    "The Eagle is a cheap coffee shop near Burger King.",
    "Zizzi serves French food in the riverside area, it is not family-friendly.",
    "Aromi is a pub.",
]
REFS = [
    [
        "The Eagle is a low-priced coffee shop located near Burger King.",
        "Near Burger King there is a cheap coffee shop called The Eagle.",
    ],
    [
        "Zizzi is a French restaurant by the riverside. It is not family-friendly.",
        "In the riverside area, Zizzi serves French food; kids are not welcome.",
        "Zizzi: French food, riverside, not family friendly.",
    ],
    ["Aromi is a pub in the city centre."],
]


def test_bleu_identical_is_100_and_case_insensitive():
    refs = [[h] for h in HYPS]
    assert metrics.bleu(HYPS, refs) == pytest.approx(100.0)
    assert metrics.bleu([h.upper() for h in HYPS], refs) == pytest.approx(100.0)


def test_bleu_matches_sacrebleu_multi_reference():
    import sacrebleu

    streams = [[r[k] if k < len(r) else None for r in REFS] for k in range(3)]
    expected = sacrebleu.corpus_bleu(HYPS, streams, lowercase=True).score
    assert metrics.bleu(HYPS, REFS) == pytest.approx(expected)


def test_bleu_nist_match_mteval_v13a():
    # Expected values from mteval-v13a.pl's scoring subroutines (the E2E scorer's BLEU/NIST),
    # run on these inputs with missing references padded empty as the scorer does.
    assert metrics.bleu(HYPS, REFS) == pytest.approx(61.9745241, abs=1e-6)
    assert metrics.nist(HYPS, REFS) == pytest.approx(4.8900, abs=5e-5)  # mteval prints 4 decimals


def _mteval_nist(hyps: list[str], refs: list[list[str]], max_n: int = 5) -> float:
    """NIST as the E2E scorer runs mteval-v13a, written from the Perl's structure for the tests.

    The scorer pads every input to the largest reference count with empty references;
    mteval then counts, per segment, only the non-empty ones, and divides all reference
    words by (non-empty references / segments) for the length penalty. Inputs here are
    lower-case words without punctuation, so splitting on spaces is mteval's tokenization.
    """
    width = max(len(r) for r in refs)
    padded = [list(r) + [""] * (width - len(r)) for r in refs]

    def grams(words: list[str]) -> Counter:
        return Counter(
            " ".join(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1)
        )

    ref_counts: Counter = Counter()
    tot_words = 0
    for rs in padded:
        for r in rs:
            ref_counts.update(grams(r.split()))
            tot_words += len(r.split())
    info = {}
    for g, c in ref_counts.items():
        prefix = " ".join(g.split()[:-1])
        info[g] = -math.log2(c / (ref_counts[prefix] if prefix else tot_words))

    tst_info = [0.0] * (max_n + 1)
    tst_cnt = [0] * (max_n + 1)
    ref_words = nrefs = 0
    for h, rs in zip(hyps, padded, strict=True):
        words = h.split()
        for n in range(1, max_n + 1):
            tst_cnt[n] += max(len(words) - n + 1, 0)
        best: dict[str, int] = {}
        for r in rs:
            nrefs += r != ""
            ref_words += len(r.split())
            for g, c in grams(r.split()).items():
                best[g] = max(best.get(g, 0), c)
        for g, c in grams(words).items():
            if g in best:
                tst_info[len(g.split())] += info[g] * min(c, best[g])
    score = sum(tst_info[n] / max(tst_cnt[n], 1) for n in range(1, max_n + 1))
    ratio = tst_cnt[1] / (ref_words / (nrefs / len(hyps)))
    if ratio >= 1:
        return score
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return score * math.exp(-beta * math.log(ratio) ** 2)


# mteval-v13a-sig.pl's NIST for the inputs of the next test, written to .sgm files padded
# with empty references the way the E2E scorer's measure_scores.py writes them
OFFICIAL_SMALL_NIST = 3.0196


def test_nist_length_penalty_counts_only_the_references_an_input_has():
    # 2, 1, 3 and 2 references, an empty and a one-word hypothesis. Hypothesis words:
    # 5 + 0 + 1 + 8 = 14; reference words 13 + 3 + 13 + 9 = 38 over 8 references for 4
    # inputs, so the mean reference length is 38 / 2 = 19 and the ratio 14 / 19 < 1 gets
    # the penalty. Dividing by the largest count (3) instead would give 12.7, ratio > 1.
    hyps = ["the eagle is a pub", "", "zizzi", "aromi is a cheap pub near the river"]
    refs = [
        ["the eagle is a pub", "the eagle is a cheap pub in town"],
        ["cotto serves food"],
        ["zizzi is a french restaurant", "zizzi serves french food", "zizzi by the river"],
        ["aromi is a pub near the river", "aromi is cheap"],
    ]
    expected = _mteval_nist(hyps, refs)
    ratio = 14 / 19
    beta = -math.log(0.5) / math.log(1.5) ** 2
    unpenalized = expected / math.exp(-beta * math.log(ratio) ** 2)
    assert metrics.nist(hyps, refs) == pytest.approx(expected, abs=1e-9)
    assert metrics.nist(hyps, refs) < unpenalized - 0.1
    # the same inputs in mteval-v13a-sig.pl as the E2E scorer writes them (4 decimals)
    assert metrics.nist(hyps, refs) == pytest.approx(OFFICIAL_SMALL_NIST, abs=5e-5)


@needs_data
def test_nist_of_zero_shot_e2e_outputs_matches_the_official_scorer():
    # results/e2e/zero-shot.predictions.txt has short outputs, so its length penalty depends
    # on how references are counted; the official E2E scorer prints NIST 3.8314 for it.
    preds = Path(__file__).resolve().parents[1] / "results/e2e/zero-shot.predictions.txt"
    groups = metrics.group_references(load_records(DATA / "e2e/testset_w_refs.csv"))
    hyps = preds.read_text().splitlines()
    assert metrics.nist(hyps, [r for _, r in groups]) == pytest.approx(3.8314, abs=5e-5)


@needs_data
def test_bleu_nist_match_mteval_on_e2e_dev():
    groups = metrics.group_references(load_records(DATA / "e2e/devset.csv"))[:60]

    def template(mr: str) -> str:  # a fixed rule-based system
        f = dict(re.findall(r"(\w[\w ]*)\[(.*?)\]", mr))
        s = f"{f.get('name', 'It')} is a {f.get('eatType', 'restaurant')}"
        for key, fmt in (
            ("food", " serving {} food"),
            ("area", " in the {}"),
            ("near", " near {}"),
        ):
            if key in f:
                s += fmt.format(f[key])
        return s + "."

    hyps = [template(mr) for mr, _ in groups]
    refs = [r for _, r in groups]
    assert sum(map(len, refs)) == 501
    # mteval-v13a.pl values for this system (see test_bleu_nist_match_mteval_v13a)
    assert metrics.bleu(hyps, refs) == pytest.approx(46.71334038, abs=1e-6)
    assert metrics.nist(hyps, refs) == pytest.approx(2.7485, abs=5e-5)  # short outputs: penalized
    scores = metrics.generation_scores(hyps, refs, with_meteor=False)
    assert scores.meteor is None and "with_meteor=False" in scores.notes[-1]
    assert 0 < scores.rouge_l < 100 and 0 < scores.cider < 10


@needs_java
def test_rouge_cider_against_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # coco-caption's pipeline: PTB-tokenize (lowercase, punctuation dropped), then score
    h_tok, r_tok = metrics._coco_tokenize(HYPS, REFS, notes := [])
    assert not notes
    assert h_tok[2] == ["aromi is a pub"]
    assert metrics.rouge_l(HYPS, REFS) == pytest.approx(
        100 * Rouge().compute_score(r_tok, h_tok)[0]
    )
    assert metrics.cider(HYPS, REFS) == pytest.approx(Cider().compute_score(r_tok, h_tok)[0])
    assert metrics.rouge_l(HYPS, [[h] for h in HYPS]) == pytest.approx(100.0)


@needs_java
@pytest.mark.skipif(
    not os.environ.get("LORAKIT_TEST_METEOR"),
    reason="slow (the JVM loads METEOR's paraphrase tables: 15-30 s a call); set LORAKIT_TEST_METEOR=1",
)
def test_meteor_runs_on_java():
    score, reason = metrics.meteor(
        HYPS + ["A totally unrelated sentence about cars."], REFS + [["The Eagle is a pub."]]
    )
    assert reason is None
    assert 20 < score < 90
    same, _ = metrics.meteor(
        ["the eagle is a pub near the river"], [["The Eagle is a pub near the river."]]
    )
    assert same > 95


def test_without_java_meteor_is_none_and_others_fall_back(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    scores = metrics.generation_scores(HYPS, REFS)
    assert scores.meteor is None
    assert any("no Java runtime" in n and "default-jre-headless" in n for n in scores.notes)
    assert any("NLTK Treebank" in n for n in scores.notes)
    assert scores.bleu == pytest.approx(61.9745241, abs=1e-6)  # BLEU/NIST need no Java
    assert 0 < scores.rouge_l < 100 and 0 < scores.cider
    assert set(scores.as_dict()) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}


def test_generation_input_errors():
    with pytest.raises(ConfigError, match="2 hypotheses for 3 reference lists"):
        metrics.bleu(HYPS[:2], REFS)
    with pytest.raises(ConfigError, match="Input 1 has no reference text"):
        metrics.nist(HYPS[:2], [REFS[0], []])
    with pytest.raises(ConfigError, match="not one string"):
        metrics.bleu("a string", [["a string"]])
    with pytest.raises(ConfigError, match="No hypotheses"):
        metrics.bleu([], [])
