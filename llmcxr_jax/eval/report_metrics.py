"""Report-generation metrics, numpy only: CheXpert-label agreement between reference and generated
reports (F1, precision, recall, Jaccard, AUROC; micro / macro / weighted, as sklearn computes them)
and text overlap (BLEU-1..4, ROUGE-L and CIDEr-D, as the COCO caption toolkit computes them).

Label semantics. Inputs are [n_reports, n_classes] arrays with 1 (positive), 0 (negative), -1
(uncertain) and nan (not mentioned), columns in CHEXPERT_LABELS order (all 14, No Finding included,
unless `names` says otherwise). LLM-CXR scores "positive = 1": -1 and blank count as negative
(`uncertain="negative"`, the default); `uncertain="positive"` counts -1 as positive instead.
  precision/recall/F1/Jaccard per class from tp, fp, fn; a zero denominator gives `zero_division`
    (0.0, sklearn's default), so a class that is positive in neither matrix scores F1 0 and still
    counts in the macro mean. F1 = 2tp / (2tp + fp + fn), Jaccard = tp / (tp + fp + fn).
  micro: from tp, fp, fn summed over classes; macro: unweighted mean over classes; weighted: mean
    weighted by support (reference positives), `zero_division` when no class has support.
  AUROC: the Mann-Whitney statistic with average ranks for ties, (R+ - n+(n+ + 1)/2) / (n+ n-),
    of the generated label against the reference label. Generated reports give hard 0/1 labels,
    so a class's AUROC is (TPR + TNR) / 2, its balanced accuracy. A class whose reference column
    has one value only gets nan and is left out of the macro and weighted means (sklearn raises
    instead); micro pools all (report, class) pairs into one binary problem.
  Intervals (ci_samples > 0): a percentile bootstrap over reports. Each of ci_samples resamples
    draws n reports with replacement (a fixed seed) and recomputes the per-class F1 and AUROC;
    the interval is the 2.5th-97.5th percentile, resamples giving nan (a class with one reference
    value) left out. It measures how much the score owes to which n reports were evaluated, not
    the sampling noise of the generator.

Text semantics. `tokenize`: lowercase; tokens are words (letters with inner hyphens or
apostrophes: "plate-like", "can't"), numbers (with a decimal point: "2.5") and single punctuation
marks, which are dropped unless keep_punctuation=True (the COCO toolkit's PTB tokenizer drops them
too); "___" (MIMIC de-identification) is punctuation. Candidates are one string each; references
one string or a list of strings per candidate.
  BLEU (Papineni 2002): clipped n-gram counts and candidate n-gram counts summed over the corpus,
    brevity penalty exp(1 - r/c) when c <= r with c the total candidate length and r the sum of
    each candidate's closest reference length (ties: the shorter), BLEU-k = BP exp(sum_{i<=k}
    log p_i / k), 0 when any p_i is 0 (no smoothing). level="sentence": the mean of per-report
    BLEU with NLTK's smoothing method 1 (a zero count becomes 0.1 / max(1, candidate n-grams);
    0 when no unigram matches).
  ROUGE-L: per report, LCS-based precision and recall against each reference, the maxima of both
    combined as (1 + b^2) P R / (R + b^2 P) with b = 1.2 (0 if either is 0); mean over reports.
  CIDEr-D: n = 1..4 TF-IDF vectors, document frequency over the references of the evaluated set
    (one document per candidate), idf log(N) - log(max(1, df)); per n the clipped cosine
    sum min(c, r) r / (|c| |r|), times the Gaussian length penalty exp(-(l_c - l_r)^2 / 72) where
    a length is the number of bigrams (as in the toolkit); mean over n, mean over references,
    times 10, mean over reports. With a single report every idf is 0, so CIDEr-D is 0.
METEOR is not implemented (it needs WordNet and the Java original).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

from llmcxr_jax.data.mimic_cxr import CHEXPERT_LABELS

__all__ = ["auroc", "auroc_columns", "binarize", "bleu", "bootstrap_interval", "cider_d", "corpus_bleu",
           "label_metrics", "rouge_l", "rouge_l_score", "sentence_bleu", "text_metrics", "tokenize"]

# ----------------------------------------------------------------------------- labels


def binarize(labels, uncertain: str = "negative") -> np.ndarray:
    """{1, 0, -1, nan} labels -> int 0/1: 1 is positive, blank and 0 negative, -1 per `uncertain`."""
    if uncertain not in ("negative", "positive"):
        raise ValueError(f"uncertain must be 'negative' or 'positive', got {uncertain!r}")
    x = np.asarray(labels, dtype=np.float64)
    known = x[~np.isnan(x)]
    bad = known[~np.isin(known, (1.0, 0.0, -1.0))]
    if bad.size:
        raise ValueError(f"labels must be 1, 0, -1 or nan, found {bad[0]!r}")
    positive = (x == 1.0) | ((x == -1.0) if uncertain == "positive" else False)
    return positive.astype(np.int64)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    _, inverse, counts = np.unique(x[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                 # last 1-based rank of each tie group
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = (ends - (counts - 1) / 2.0)[inverse]
    return ranks


def auroc(y_true, y_score) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic (ties count half); nan when
    y_true holds a single class."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} values, y_score {s.size}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_interval(statistic, n: int, *, samples: int = 1000, level: float = 0.95, seed: int = 0) -> np.ndarray:
    """Percentile bootstrap of `statistic(idx) -> [k]` over n items: `samples` draws of n indices
    with replacement -> [k, 2] (lower, upper) bounds at `level`; nan where every draw gave nan."""
    if n < 1 or samples < 1 or not 0 < level < 1:
        raise ValueError(f"a bootstrap needs n >= 1 items, samples >= 1 and 0 < level < 1; got {n}, {samples}, {level}")
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    values = np.stack([np.asarray(statistic(i), dtype=np.float64) for i in idx])  # [samples, k]
    tail = 100 * (1 - level) / 2
    out = np.full((values.shape[1], 2), np.nan)
    for k in range(values.shape[1]):
        v = values[:, k][~np.isnan(values[:, k])]
        if v.size:
            out[k] = np.percentile(v, [tail, 100 - tail])
    return out


def auroc_columns(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-column AUROC of [n, k] 0/1 labels against [n, k] scores -> [k] (nan: one class only)."""
    return np.array([auroc(y[:, k], scores[:, k]) for k in range(y.shape[1])])


def _ratio(num, den, zero_division: float):
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), zero_division)


def _averages(per_class: np.ndarray, support: np.ndarray, zero_division: float) -> tuple[float, float]:
    macro = float(per_class.mean()) if per_class.size else zero_division
    total = support.sum()
    weighted = float((per_class * support).sum() / total) if total > 0 else zero_division
    return macro, weighted


def _f1_columns(y: np.ndarray, p: np.ndarray, zero_division: float) -> np.ndarray:
    tp, fp, fn = (y & p).sum(0), ((1 - y) & p).sum(0), (y & (1 - p)).sum(0)
    return _ratio(2 * tp, 2 * tp + fp + fn, zero_division)


def label_metrics(reference, generated, *, uncertain: str = "negative", names: Sequence[str] = CHEXPERT_LABELS,
                  zero_division: float = 0.0, ci_samples: int = 0) -> dict:
    """Reference vs generated label matrices [n, len(names)] -> {"f1_micro", "f1_macro",
    "f1_weighted", the same for precision, recall, jaccard and auroc, "n_reports", "per_class":
    {name: {precision, recall, f1, jaccard, auroc, support, predicted}}}, each class also with
    "f1_ci" and "auroc_ci" [lower, upper] when ci_samples > 0. See the module docstring."""
    ref, gen = np.asarray(reference, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != gen.shape or ref.shape[1] != len(names):
        raise ValueError(f"reference {ref.shape} and generated {gen.shape} must both be [n, {len(names)}]")
    y, p = binarize(ref, uncertain), binarize(gen, uncertain)
    tp = (y & p).sum(0)
    fp = ((1 - y) & p).sum(0)
    fn = (y & (1 - p)).sum(0)
    support = y.sum(0)
    per = {
        "precision": _ratio(tp, tp + fp, zero_division),
        "recall": _ratio(tp, tp + fn, zero_division),
        "f1": _f1_columns(y, p, zero_division),
        "jaccard": _ratio(tp, tp + fp + fn, zero_division),
    }
    T, P, F = tp.sum(), fp.sum(), fn.sum()
    micro = {"precision": _ratio(T, T + P, zero_division), "recall": _ratio(T, T + F, zero_division),
             "f1": _ratio(2 * T, 2 * T + P + F, zero_division), "jaccard": _ratio(T, T + P + F, zero_division)}
    out: dict = {"n_reports": int(ref.shape[0])}
    for metric, values in per.items():
        macro, weighted = _averages(values, support, zero_division)
        out[f"{metric}_micro"] = float(micro[metric])
        out[f"{metric}_macro"], out[f"{metric}_weighted"] = macro, weighted
    aucs = auroc_columns(y, p)
    valid = ~np.isnan(aucs)
    out["auroc_micro"] = auroc(y.ravel(), p.ravel())
    out["auroc_macro"] = float(aucs[valid].mean()) if valid.any() else float("nan")
    out["auroc_weighted"] = (float((aucs[valid] * support[valid]).sum() / support[valid].sum()) if valid.any()
                             else float("nan"))
    out["per_class"] = {name: {"precision": float(per["precision"][k]), "recall": float(per["recall"][k]),
                               "f1": float(per["f1"][k]), "jaccard": float(per["jaccard"][k]),
                               "auroc": float(aucs[k]), "support": int(support[k]), "predicted": int(p[:, k].sum())}
                        for k, name in enumerate(names)}
    if ci_samples:
        f1_ci = bootstrap_interval(lambda i: _f1_columns(y[i], p[i], zero_division), len(y), samples=ci_samples)
        auc_ci = bootstrap_interval(lambda i: auroc_columns(y[i], p[i]), len(y), samples=ci_samples)
        for k, name in enumerate(names):
            out["per_class"][name] |= {"f1_ci": f1_ci[k].tolist(), "auroc_ci": auc_ci[k].tolist()}
    return out


# ----------------------------------------------------------------------------- text

_TOKEN = re.compile(r"\d+(?:\.\d+)?|[a-z]+(?:[-'][a-z]+)*|[^\sa-z\d]")


def tokenize(text: str, keep_punctuation: bool = False) -> list[str]:
    """Lowercase word / number tokens; punctuation split off and dropped unless kept."""
    tokens = _TOKEN.findall(text.lower())
    return tokens if keep_punctuation else [t for t in tokens if t[0].isalnum()]


def _references(candidates, references) -> list[list[str]]:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference entries")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("every candidate needs at least one reference")
    return refs


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu_counts(hyp: Sequence[str], refs: Sequence[Sequence[str]], max_n: int):
    """Clipped matches and candidate n-gram totals for n = 1..max_n, and the closest ref length."""
    matches, totals = [], []
    for n in range(1, max_n + 1):
        counts = _ngrams(hyp, n)
        best: Counter = Counter()
        for r in refs:
            best |= _ngrams(r, n)  # per n-gram, its largest count in any one reference
        matches.append(sum(min(c, best[g]) for g, c in counts.items()))
        totals.append(sum(counts.values()))
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    return matches, totals, closest


def _brevity_penalty(c: int, r: int) -> float:
    if c == 0:
        return 0.0
    return 1.0 if c > r else math.exp(1.0 - r / c)


def _geometric(bp: float, precisions: list[float]) -> list[float]:
    """BLEU-1..N from p_1..p_N (uniform weights); 0 once any p_i is 0."""
    out, log_sum = [], 0.0
    for k, p in enumerate(precisions, 1):
        if p <= 0.0 or math.isinf(log_sum):
            log_sum = -math.inf
            out.append(0.0)
            continue
        log_sum += math.log(p)
        out.append(bp * math.exp(log_sum / k))
    return out


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
                max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n of tokenized hypotheses against their tokenized reference lists."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    matches, totals = np.zeros(max_n), np.zeros(max_n)
    c = r = 0
    for hyp, refs in zip(hypotheses, references):
        m, t, closest = _bleu_counts(hyp, refs, max_n)
        matches += m
        totals += t
        c, r = c + len(hyp), r + closest
    precisions = [m / t if t > 0 else 0.0 for m, t in zip(matches, totals)]
    return _geometric(_brevity_penalty(c, r), precisions)


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
                  smoothing: int | None = 1) -> list[float]:
    """BLEU-1..max_n of one tokenized hypothesis; smoothing=1 is NLTK's method 1 (epsilon 0.1),
    None none."""
    if smoothing not in (None, 1):
        raise ValueError(f"smoothing must be None or 1, got {smoothing!r}")
    matches, totals, closest = _bleu_counts(hypothesis, references, max_n)
    if matches[0] == 0:
        return [0.0] * max_n
    if smoothing == 1:
        precisions = [(m if m > 0 else 0.1) / max(1, t) for m, t in zip(matches, totals)]
    else:
        precisions = [m / t if t > 0 else 0.0 for m, t in zip(matches, totals)]
    return _geometric(_brevity_penalty(len(hypothesis), closest), precisions)


def bleu(candidates: Sequence[str], references, max_n: int = 4, level: str = "corpus",
         keep_punctuation: bool = False) -> dict[str, float]:
    """{"bleu_1": ..., "bleu_<max_n>": ...} of report strings. level "corpus" (Papineni, no
    smoothing) or "sentence" (mean of smoothed sentence BLEU)."""
    refs = _references(candidates, references)
    hyps = [tokenize(c, keep_punctuation) for c in candidates]
    toks = [[tokenize(r, keep_punctuation) for r in rs] for rs in refs]
    if level == "corpus":
        scores = corpus_bleu(hyps, toks, max_n)
    elif level == "sentence":
        per = np.array([sentence_bleu(h, r, max_n) for h, r in zip(hyps, toks)]).reshape(-1, max_n)
        scores = list(per.mean(0)) if len(per) else [0.0] * max_n
    else:
        raise ValueError(f"level must be 'corpus' or 'sentence', got {level!r}")
    return {f"bleu_{k}": float(s) for k, s in enumerate(scores, 1)}


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_score(candidate: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """ROUGE-L F of one tokenized candidate against its tokenized references (COCO toolkit)."""
    precisions, recalls = [], []
    for ref in references:
        lcs = _lcs(candidate, ref)
        precisions.append(lcs / len(candidate) if candidate else 0.0)
        recalls.append(lcs / len(ref) if ref else 0.0)
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def rouge_l(candidates: Sequence[str], references, beta: float = 1.2, keep_punctuation: bool = False) -> float:
    """Mean ROUGE-L F over reports."""
    refs = _references(candidates, references)
    scores = [rouge_l_score(tokenize(c, keep_punctuation), [tokenize(r, keep_punctuation) for r in rs], beta)
              for c, rs in zip(candidates, refs)]
    return float(np.mean(scores)) if scores else 0.0


def _cider_counts(tokens: Sequence[str], n: int) -> Counter:
    out: Counter = Counter()
    for k in range(1, n + 1):
        out.update(_ngrams(tokens, k))
    return out


def cider_d(candidates: Sequence[str], references, n: int = 4, sigma: float = 6.0,
            keep_punctuation: bool = False, per_report: bool = False):
    """CIDEr-D of the corpus (the mean over reports), or (mean, per-report scores) with per_report."""
    refs = _references(candidates, references)
    hyp_counts = [_cider_counts(tokenize(c, keep_punctuation), n) for c in candidates]
    ref_counts = [[_cider_counts(tokenize(r, keep_punctuation), n) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rs in ref_counts:
        df.update(set().union(*(r.keys() for r in rs)))
    log_n = math.log(float(len(candidates))) if candidates else 0.0

    def vectorize(counts: Counter):
        vec = [dict() for _ in range(n)]
        norm = np.zeros(n)
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:
                length += tf  # the toolkit's length: the number of bigrams
        return vec, np.sqrt(norm), length

    scores = []
    for hyp, rs in zip(hyp_counts, ref_counts):
        vh, nh, lh = vectorize(hyp)
        total = np.zeros(n)
        for ref in rs:
            vr, nr, lr = vectorize(ref)
            val = np.zeros(n)
            for k in range(n):
                val[k] = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val[k] /= nh[k] * nr[k]
            total += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        scores.append(float(total.mean() / len(rs) * 10.0))
    mean = float(np.mean(scores)) if scores else 0.0
    return (mean, scores) if per_report else mean


def text_metrics(candidates: Sequence[str], references, keep_punctuation: bool = False) -> dict[str, float]:
    """Corpus BLEU-1..4, ROUGE-L and CIDEr-D of generated reports against references."""
    return {**bleu(candidates, references, keep_punctuation=keep_punctuation),
            "rouge_l": rouge_l(candidates, references, keep_punctuation=keep_punctuation),
            "cider_d": cider_d(candidates, references, keep_punctuation=keep_punctuation)}
