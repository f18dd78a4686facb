"""Evaluation metrics: classification, regression, language-model perplexity, data-to-text generation.

Classification and regression scores come from scikit-learn and SciPy. Generation scores
follow the official E2E NLG challenge scorer (github.com/tuetschek/e2e-metrics), which the
LoRA paper reports (Table 3):

| metric  | scorer used there                        | here                                        |
|---------|------------------------------------------|---------------------------------------------|
| BLEU    | mteval-v13a.pl, case-insensitive         | sacrebleu (13a tokenizer, mteval smoothing)  |
| NIST    | mteval-v13a.pl, case-insensitive, n=5    | mteval-v13a's formula (`nist`; see there)    |
| METEOR  | coco-caption METEOR 1.5 (Java)           | pycocoevalcap's METEOR 1.5 (Java)            |
| ROUGE-L | coco-caption ROUGE-L                     | pycocoevalcap                                |
| CIDEr   | coco-caption CIDEr                       | pycocoevalcap                                |

METEOR, ROUGE-L and CIDEr see the text after coco-caption's Stanford PTB tokenizer
(lowercased, punctuation dropped), as in the official scorer. Both the tokenizer and
METEOR run on Java; without Java, METEOR is None (with the reason in the notes) and
ROUGE-L / CIDEr use NLTK's Treebank tokenizer with the same lowercasing and punctuation
removal instead (noted too), which can move them slightly.

Scales follow the paper: BLEU, METEOR and ROUGE-L in percent (0-100), NIST and CIDEr raw.
Multi-reference inputs pair one hypothesis with a list of references; `group_references`
builds those lists from E2E rows.

Library imports are local to the functions, so `import lorakit.eval.metrics` stays cheap and a
missing optional library only matters to the metric that needs it.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.data.readers import group_references
from lorakit.errors import ConfigError

__all__ = [
    "GenerationScores",
    "accuracy",
    "bleu",
    "cider",
    "classification_scores",
    "f1",
    "generation_scores",
    "group_references",
    "matthews",
    "meteor",
    "nist",
    "pearson",
    "perplexity",
    "regression_scores",
    "rouge_l",
    "spearman",
]


# ------------------------------------------------------------------ classification / regression


def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Fraction of predictions equal to their label, in [0, 1].

    Raises:
        ConfigError: different lengths or no items.
    """
    from sklearn.metrics import accuracy_score

    y_pred, y_true = _pair(predictions, labels)
    return float(accuracy_score(y_true, y_pred))


def f1(
    predictions: Sequence[Any], labels: Sequence[Any], average: str = "binary", pos_label: Any = 1
) -> float:
    """F1 score in [0, 1]: `average="binary"` scores class `pos_label` (GLUE MRPC, QQP: 1);
    `"macro"` averages the per-class F1 without weighting. An undefined F1 (no positive
    predicted and none true) counts as 0, as scikit-learn's `zero_division=0` does.

    Raises:
        ConfigError: different lengths, no items, or an unknown `average`.
    """
    from sklearn.metrics import f1_score

    if average not in ("binary", "macro"):
        raise ConfigError(f"f1 average must be 'binary' or 'macro', got {average!r}.")
    y_pred, y_true = _pair(predictions, labels)
    kwargs = {"pos_label": pos_label} if average == "binary" else {}
    return float(f1_score(y_true, y_pred, average=average, zero_division=0, **kwargs))


def matthews(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Matthews correlation coefficient in [-1, 1] (GLUE CoLA's metric); 0 when undefined.

    Raises:
        ConfigError: different lengths or no items.
    """
    from sklearn.metrics import matthews_corrcoef

    y_pred, y_true = _pair(predictions, labels)
    return float(matthews_corrcoef(y_true, y_pred))


def pearson(predictions: Sequence[float], targets: Sequence[float]) -> float:
    """Pearson correlation in [-1, 1]; NaN when either side is constant.

    Raises:
        ConfigError: different lengths or fewer than 2 items.
    """
    from scipy.stats import pearsonr

    x, y = _pair(predictions, targets, at_least=2)
    if _constant(x) or _constant(y):
        return math.nan
    return float(pearsonr(x, y)[0])


def spearman(predictions: Sequence[float], targets: Sequence[float]) -> float:
    """Spearman rank correlation in [-1, 1]; NaN when either side is constant.

    Raises:
        ConfigError: different lengths or fewer than 2 items.
    """
    from scipy.stats import spearmanr

    x, y = _pair(predictions, targets, at_least=2)
    if _constant(x) or _constant(y):
        return math.nan
    return float(spearmanr(x, y)[0])


def classification_scores(predictions: Sequence[Any], labels: Sequence[Any]) -> dict[str, float]:
    """`accuracy`, `f1` (binary on class 1 when the labels are {0, 1}, else macro) and `mcc`.

    Raises:
        ConfigError: different lengths or no items.
    """
    y_pred, y_true = _pair(predictions, labels)
    binary = set(y_true) | set(y_pred) <= {0, 1}
    return {
        "accuracy": accuracy(y_pred, y_true),
        "f1": f1(y_pred, y_true, average="binary" if binary else "macro"),
        "mcc": matthews(y_pred, y_true),
    }


def regression_scores(predictions: Sequence[float], targets: Sequence[float]) -> dict[str, float]:
    """`pearson`, `spearman` and their mean `corr` (how GLUE STS-B is summarized).

    Raises:
        ConfigError: different lengths or fewer than 2 items.
    """
    p, s = pearson(predictions, targets), spearman(predictions, targets)
    return {"pearson": p, "spearman": s, "corr": (p + s) / 2}


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf when that overflows.

    Average the loss over tokens (not over batches of unequal token counts) before calling.

    Raises:
        ConfigError: the loss is negative or NaN.
    """
    if not mean_loss >= 0:  # also catches NaN
        raise ConfigError(
            f"Perplexity needs a mean cross-entropy >= 0, got {mean_loss}. Check the loss "
            f"(NaN usually means a batch with no loss tokens or a diverged run)."
        )
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


# ----------------------------------------------------------------------------- generation


@dataclass
class GenerationScores:
    """Corpus-level data-to-text scores, on the E2E scorer's scales (see the module docstring)."""

    bleu: float
    nist: float
    meteor: float | None
    rouge_l: float
    cider: float
    notes: list[str] = field(default_factory=list)
    """Deviations from the official scorer (e.g. "METEOR skipped: no Java")."""

    def as_dict(self) -> dict[str, float | None]:
        """Metric name -> value, named as the E2E scorer prints them."""
        return {
            "BLEU": self.bleu,
            "NIST": self.nist,
            "METEOR": self.meteor,
            "ROUGE_L": self.rouge_l,
            "CIDEr": self.cider,
        }


def generation_scores(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    with_meteor: bool = True,
) -> GenerationScores:
    """BLEU, NIST, METEOR, ROUGE-L and CIDEr of one output per input against its references.

    Args:
        hypotheses: one generated text per input.
        references: for each input, a non-empty list of reference texts.
        with_meteor: False skips METEOR (the slowest: the JVM loads paraphrase tables).

    Raises:
        ConfigError: different lengths, no inputs, or an input with no reference.
        ImportError: sacrebleu or pycocoevalcap is not installed.
    """
    hyps, refs = _check_generation(hypotheses, references)
    notes: list[str] = []
    h_tok, r_tok = _coco_tokenize(hyps, refs, notes)
    if with_meteor:
        met, reason = _meteor_tokenized(h_tok, r_tok)
        if reason:
            notes.append(reason)
    else:
        met = None
        notes.append("METEOR not computed (with_meteor=False).")
    return GenerationScores(
        bleu=bleu(hyps, refs),
        nist=nist(hyps, refs),
        meteor=met,
        rouge_l=_rouge_l_tokenized(h_tok, r_tok),
        cider=_cider_tokenized(h_tok, r_tok),
        notes=notes,
    )


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in percent, as mteval-v13a computes it by default.

    Case-insensitive (ASCII letters lowered, as mteval does), 13a tokenization, brevity
    penalty from the closest reference length (ties: the shorter), and mteval's smoothing
    of zero n-gram matches, all through sacrebleu. Inputs may have different numbers of
    references.

    Raises:
        ConfigError: different lengths, no inputs, or an input with no reference.
    """
    import sacrebleu

    hyps, refs = _check_generation(hypotheses, references)
    width = max(len(r) for r in refs)
    # sacrebleu takes one stream per reference position; None marks "no reference here".
    streams = [[_ascii_lower(r[k]) if k < len(r) else None for r in refs] for k in range(width)]
    result = sacrebleu.corpus_bleu(
        [_ascii_lower(h) for h in hyps], streams, tokenize="13a", lowercase=False
    )
    return float(result.score)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST-5 as mteval-v13a computes it (the E2E scorer's NIST).

    No maintained library reproduces mteval's NIST (NLTK's `corpus_nist` scores each
    hypothesis against its single best reference and sums reference lengths differently),
    so this follows mteval-v13a.pl's formula (Doddington, 2002) line for line:

    - text lowered (ASCII letters) and split by the 13a tokenizer (sacrebleu's port);
    - info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over every reference of the
      corpus (count of the empty prefix = all reference words);
    - a hypothesis n-gram matches up to its largest count in any one of its references;
    - score = sum over n <= max_n of (info of matched n-grams / hypothesis n-grams),
      times exp(-beta * log(ratio)^2) when ratio = hypothesis words / mean reference
      words < 1, beta making the penalty 0.5 at ratio 2/3;
    - the mean reference length is all reference words / the mean number of non-empty
      references per input: the E2E scorer pads inputs with fewer references with empty
      ones, and its mteval counts only the non-empty references of each input.

    Raises:
        ConfigError: different lengths, no inputs, or an input with no reference.
    """
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    hyps, refs = _check_generation(hypotheses, references)
    tok = Tokenizer13a()
    hyp_words = [tok(_ascii_lower(h)).split() for h in hyps]
    ref_words = [[tok(_ascii_lower(r)).split() for r in rs] for rs in refs]

    # per reference and order: n-gram counts, ref_grams[i][k][n - 1]
    ref_grams = [
        [[Counter(_ngrams(words, n)) for n in range(1, max_n + 1)] for words in rs]
        for rs in ref_words
    ]
    # n-gram counts over all references of the corpus, for the information weights
    counts: Counter[tuple[str, ...]] = Counter()
    for per_ref in ref_grams:
        for per_order in per_ref:
            for c in per_order:
                counts.update(c)
    total_ref_words = sum(len(words) for rs in ref_words for words in rs)

    def info(gram: tuple[str, ...]) -> float:
        prefix = gram[:-1]
        # mteval tests the prefix string for Perl truth, so a prefix "0" counts as empty
        denom = counts[prefix] if prefix and prefix != ("0",) else total_ref_words
        return -math.log2(counts[gram] / denom)

    gained = [0.0] * (max_n + 1)  # information of matched n-grams, per order
    tested = [0] * (max_n + 1)  # hypothesis n-grams, per order
    for words, per_ref in zip(hyp_words, ref_grams, strict=True):
        for n in range(1, max_n + 1):
            tested[n] += max(len(words) - n + 1, 0)
            best: dict[tuple[str, ...], int] = {}  # largest count in any one reference
            for per_order in per_ref:
                for gram, c in per_order[n - 1].items():
                    if c > best.get(gram, 0):
                        best[gram] = c
            for gram, c in Counter(_ngrams(words, n)).items():
                if gram in best:
                    gained[n] += info(gram) * min(c, best[gram])
    score = sum(gained[n] / max(tested[n], 1) for n in range(1, max_n + 1))

    # references that tokenize to nothing are the scorer's padding and do not count
    nonempty_refs = sum(1 for rs in ref_words for words in rs if words)
    mean_ref = total_ref_words * len(refs) / nonempty_refs if nonempty_refs else 0.0
    ratio = tested[1] / mean_ref if mean_ref else 0.0
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        beta = -math.log(0.5) / math.log(1.5) ** 2
        penalty = math.exp(-beta * math.log(ratio) ** 2)
    return score * penalty


def meteor(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[float | None, str | None]:
    """METEOR 1.5 in percent (coco-caption's, `-l en -norm`, after PTB tokenization).

    Returns:
        `(score, None)`, or `(None, reason)` when it cannot run (no Java, or the JVM failed).

    Raises:
        ConfigError: different lengths, no inputs, or an input with no reference.
    """
    hyps, refs = _check_generation(hypotheses, references)
    notes: list[str] = []
    h_tok, r_tok = _coco_tokenize(hyps, refs, notes)
    return _meteor_tokenized(h_tok, r_tok)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F-measure (beta 1.2, best reference) in percent, coco-caption's, after PTB tokenization.

    Raises:
        ConfigError: different lengths, no inputs, or an input with no reference.
    """
    hyps, refs = _check_generation(hypotheses, references)
    return _rouge_l_tokenized(*_coco_tokenize(hyps, refs, []))


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr (coco-caption's CIDEr-D: n <= 4, sigma 6), document frequencies from these references.

    Raises:
        ConfigError: different lengths, no inputs, or an input with no reference.
    """
    hyps, refs = _check_generation(hypotheses, references)
    return _cider_tokenized(*_coco_tokenize(hyps, refs, []))


# ---------------------------------------------------------------------------- internals

# The fallback imitates coco-caption's pipeline output: Stanford PTB writes brackets as
# -lrb- etc. (kept: the punctuation list has them in upper case, the output is lowered) and
# "£" as "#"; then coco-caption drops its PUNCTUATIONS list.
_FALLBACK_MAP = {
    "(": "-lrb-",
    ")": "-rrb-",
    "{": "-lcb-",
    "}": "-rcb-",
    "[": "-lsb-",
    "]": "-rsb-",
    "£": "#",
}
_FALLBACK_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    # mteval lowercases with tr/A-Z/a-z/: ASCII letters only ("É" stays "É")
    return text.translate(_ASCII_LOWER)


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _pair(a: Sequence[Any], b: Sequence[Any], at_least: int = 1) -> tuple[list[Any], list[Any]]:
    a, b = _to_list(a), _to_list(b)
    if len(a) != len(b):
        raise ConfigError(
            f"Got {len(a)} predictions for {len(b)} labels; they must pair up one to one."
        )
    if len(a) < at_least:
        raise ConfigError(f"Need at least {at_least} prediction/label pairs, got {len(a)}.")
    return a, b


def _to_list(x: Any) -> list[Any]:
    if hasattr(x, "tolist"):  # numpy arrays and torch tensors
        x = x.tolist()
    return list(x)


def _constant(x: list[float]) -> bool:
    return all(v == x[0] for v in x)


def _check_generation(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    if isinstance(hypotheses, str):
        raise ConfigError("hypotheses must be a list of strings, one per input, not one string.")
    hyps = [str(h) for h in hypotheses]
    refs = []
    for i, r in enumerate(references):
        if isinstance(r, str):
            r = [r]  # one reference given bare
        r = [str(x) for x in r]
        if not r:
            raise ConfigError(
                f"Input {i} has no reference text; every hypothesis needs at least one. Drop "
                f"unreferenced inputs (e.g. E2E testset.csv has none; use testset_w_refs.csv)."
            )
        refs.append(r)
    if len(hyps) != len(refs):
        raise ConfigError(
            f"Got {len(hyps)} hypotheses for {len(refs)} reference lists. Pass one output per "
            f"input; for E2E, group the rows by MR first (group_references)."
        )
    if not hyps:
        raise ConfigError("No hypotheses to score.")
    return hyps, refs


def _coco_tokenize(
    hyps: list[str], refs: list[list[str]], notes: list[str]
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """coco-caption's PTB tokenization as `{i: [hyp]}`, `{i: refs}`; the NLTK fallback without Java."""
    texts = hyps + [r for rs in refs for r in rs]
    tokenized = None
    if shutil.which("java"):
        try:
            tokenized = _ptb_tokenize(texts)
        except (OSError, RuntimeError) as e:
            notes.append(f"Stanford PTB tokenizer failed ({e}); used NLTK Treebank tokenization.")
    else:
        notes.append(
            "No Java: ROUGE-L and CIDEr used NLTK Treebank tokenization, not Stanford PTB."
        )
    if tokenized is None:
        tokenized = [_fallback_tokenize(t) for t in texts]
    h_tok = {i: [tokenized[i]] for i in range(len(hyps))}
    r_tok, pos = {}, len(hyps)
    for i, rs in enumerate(refs):
        r_tok[i] = tokenized[pos : pos + len(rs)]
        pos += len(rs)
    return h_tok, r_tok


def _ptb_tokenize(texts: list[str]) -> list[str]:
    """Run coco-caption's Stanford PTB tokenizer (the jar pycocoevalcap ships) on texts.

    Same command and post-processing as pycocoevalcap's `PTBTokenizer` (lowercase, one
    line per text, its punctuation list dropped), but through stdin/stdout: that wrapper
    writes a temporary file next to the jar (failing in read-only installs) and lets the
    JVM print progress on our stderr.

    Raises:
        RuntimeError: the JVM failed or returned a different number of lines.
    """
    import subprocess
    from pathlib import Path

    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    cmd = [
        "java",
        "-cp",
        str(jar),
        "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines",
        "-lowerCase",
    ]
    data = "\n".join(t.replace("\r", " ").replace("\n", " ") for t in texts) + "\n"
    proc = subprocess.run(cmd, input=data.encode("utf-8"), capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) > len(texts) and not any(lines[len(texts) :]):
        lines = lines[: len(texts)]  # trailing newline(s)
    if len(lines) != len(texts):
        raise RuntimeError(f"{len(lines)} lines back for {len(texts)} texts")
    drop = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in drop) for line in lines]


def _fallback_tokenize(text: str) -> str:
    import re

    from nltk.tokenize import TreebankWordTokenizer

    text = text.replace("\n", " ").lower().replace("£", " £ ")
    # Treebank splits only a text's final period; PTB splits every sentence-ending one.
    text = re.sub(r"\.(\s|$)", r" . \1", text)
    words = (_FALLBACK_MAP.get(w, w) for w in TreebankWordTokenizer().tokenize(text))
    return " ".join(w for w in words if w not in _FALLBACK_DROP)


def _meteor_tokenized(
    h_tok: dict[int, list[str]], r_tok: dict[int, list[str]]
) -> tuple[float | None, str | None]:
    if not shutil.which("java"):
        return None, (
            "METEOR skipped: no Java runtime on PATH (METEOR 1.5 is a Java program). Install "
            "one, e.g. `apt-get install default-jre-headless`."
        )
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = None
    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(r_tok, h_tok)
        return 100.0 * float(score), None
    except (OSError, ValueError) as e:
        return None, f"METEOR skipped: the METEOR 1.5 JVM failed ({e!r})."
    finally:
        del scorer  # its __del__ stops the JVM


def _rouge_l_tokenized(h_tok: dict[int, list[str]], r_tok: dict[int, list[str]]) -> float:
    from pycocoevalcap.rouge.rouge import Rouge

    score, _ = Rouge().compute_score(r_tok, h_tok)
    return 100.0 * float(score)


def _cider_tokenized(h_tok: dict[int, list[str]], r_tok: dict[int, list[str]]) -> float:
    from pycocoevalcap.cider.cider import Cider

    score, _ = Cider().compute_score(r_tok, h_tok)
    return float(score)
