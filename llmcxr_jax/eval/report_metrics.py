"""Report-generation metrics, computed by the libraries the field uses: CheXpert-label agreement
between reference and generated reports by scikit-learn (F1, precision, recall, Jaccard, AUROC;
micro / macro / weighted) and text overlap by pycocoevalcap, the COCO caption toolkit (BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D). This module only states the label semantics and feeds the libraries.

Label semantics. Inputs are [n_reports, n_classes] arrays with 1 (positive), 0 (negative), -1
(uncertain) and nan (not mentioned), columns in CHEXPERT_LABELS order (all 14, No Finding included,
unless `names` says otherwise). LLM-CXR scores "positive = 1": -1 and blank count as negative
(`uncertain="negative"`, the default); `uncertain="positive"` counts -1 as positive instead
(`binarize`). The 0/1 matrices then go to sklearn.metrics as a multilabel problem:
  precision / recall / F1: precision_recall_fscore_support; Jaccard: jaccard_score; both with
    `zero_division` (0.0 by default, sklearn's value for an empty denominator), so a class that is
    positive in neither matrix scores F1 0 and still counts in the macro mean. micro pools tp, fp,
    fn over classes, macro is the unweighted mean, weighted the support-weighted mean (sklearn: the
    unweighted mean when no class has support).
  AUROC: roc_auc_score per class, of the generated label against the reference label. Generated
    reports give hard 0/1 labels, so a class's AUROC is (TPR + TNR) / 2, its balanced accuracy. A
    class whose reference column has one value only gets nan (sklearn raises) and is left out of
    the macro mean and of the support-weighted mean; micro pools all (report, class) pairs into
    one binary problem.
  Intervals (ci_samples > 0): a percentile bootstrap over reports (eval/bootstrap.py; no library
    call). Each of ci_samples resamples draws n reports with replacement (a fixed seed) and
    recomputes the per-class F1 and AUROC and the micro / macro F1 and micro AUROC, all resamples
    at once from how often each report was drawn (equal to sklearn on the resampled rows); the
    interval is the 2.5th-97.5th percentile, resamples giving nan (a class with one reference
    value) left out. It measures how much the score owes to which n reports were evaluated, not
    the sampling noise of the generator.

Text semantics. pycocoevalcap 1.2's scorers on tokenized text, candidates one string each,
references one string or a list of strings per candidate:
  BLEU-1..4: pycocoevalcap.bleu.Bleu(4), the corpus score: clipped n-gram matches and candidate
    n-grams summed over reports, brevity penalty from the sum of each candidate's closest
    reference length (ties: the shorter). Its scorer adds 1e-15 to every match count and 1e-9 to
    every n-gram count, so BLEU-n is not 0 when no n-gram matches (e.g. ~0.03 when no candidate
    has a 4-gram at all) and a non-zero BLEU differs from Papineni's by ~1e-9 / (n-gram count)
    relative (4e-13 on the synthetic corpus's reports).
  ROUGE-L: pycocoevalcap.rouge.Rouge, per report LCS precision and recall against each reference,
    their maxima combined with beta = 1.2; the mean over reports.
  CIDEr-D: pycocoevalcap.cider.Cider. The class is named CIDEr but computes CIDEr-D (Vedantam et
    al. 2015, sec. 4.2): TF-IDF n-gram vectors (n = 1..4, document frequency over the evaluated
    set's references), clipped cosine, Gaussian length penalty with sigma 6 (length = number of
    bigrams, as in the toolkit), times 10, mean over references and reports. With a single report
    every idf is 0, so CIDEr-D is 0.
  Tokens (`tokenizer`): "ptb" (the default) is pycocoevalcap's PTBTokenizer, Stanford CoreNLP
    3.4.1's PTB tokenizer run in Java (`java` on PATH, one JVM per call, ~0.5 s): lowercased, its
    punctuation list dropped. It is the COCO toolkit's own pipeline (COCOEvalCap tokenizes with it
    before scoring), the reference for BLEU / ROUGE-L / CIDEr-D; R2Gen-lineage report-generation
    code feeds the same scorers its own lowercased, punctuation-free tokens instead, which
    "simple" is close to (on the synthetic corpus every figure moves by < 0.003). PTB's quirks
    stay: "cannot" -> "can not", "can't" -> "ca n't", brackets become "-lrb-" / "-rrb-" tokens,
    "___" (MIMIC de-identification) and "a." are tokens. Each text is put on one line first (the
    JVM would also split at \\r, \\f, \\u2028, shifting every later text). The JVM prints one line
    ("PTBTokenizer tokenized ...") to stderr, and pycocoevalcap writes its input file into its own
    package folder, which must be writable. "simple" is our `tokenize` (no Java; on the synthetic
    corpus it differs from PTB only in "cannot"); "none" takes texts as already tokenized (split
    on whitespace, case kept).
  METEOR (`meteor=True`): pycocoevalcap.meteor.Meteor, the COCO toolkit's wrapper of METEOR 1.5's
    jar (`java -jar meteor-1.5.jar - - -stdio -l en -norm`: exact, stem, synonym and paraphrase
    matches, English parameters, its own normalisation) on the same tokens as the scores above.
    The score is the jar's corpus aggregate (its statistics summed over reports), not the mean of
    the per-report scores. One JVM per call, ~9 s to load the paraphrase table, closed before the
    call returns. Without `java` on PATH, or when the jar fails, METEOR is left out and
    "meteor_not_computed" states why (`meteor_unavailable`).
  Intervals (ci_samples > 0): ROUGE-L and CIDEr-D are means of per-report scores, so resampling
    reports resamples those scores (CIDEr-D keeps the document frequencies of the full set); BLEU
    and METEOR are corpus statistics and get no interval.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence

import numpy as np
import sklearn.metrics as skm
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as coco_meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from llmcxr_jax.data.mimic_cxr import CHEXPERT_LABELS
from llmcxr_jax.errors import UsageError
from llmcxr_jax.eval.bootstrap import bootstrap_interval, percentile_interval, resample_counts, score_draws

__all__ = ["TOKENIZERS", "auroc", "auroc_columns", "binarize", "bleu", "bootstrap_interval", "cider_d",
           "label_metrics", "meteor", "meteor_unavailable", "ptb_tokenize", "rouge_l", "text_metrics", "tokenize"]

# ----------------------------------------------------------------------------- labels


def binarize(labels, uncertain: str = "negative") -> np.ndarray:
    """{1, 0, -1, nan} labels -> int 0/1: 1 is positive, blank and 0 negative, -1 per `uncertain`."""
    if uncertain not in ("negative", "positive"):
        raise UsageError(f"uncertain must be 'negative' or 'positive', got {uncertain!r}")
    x = np.asarray(labels, dtype=np.float64)
    known = x[~np.isnan(x)]
    bad = known[~np.isin(known, (1.0, 0.0, -1.0))]
    if bad.size:
        raise UsageError(f"labels must be 1, 0, -1 or nan, found {bad[0]!r}")
    positive = (x == 1.0) | ((x == -1.0) if uncertain == "positive" else False)
    return positive.astype(np.int64)


def auroc(y_true, y_score) -> float:
    """sklearn's roc_auc_score of 0/1 labels against scores; nan when y_true holds a single class."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise UsageError(f"y_true has {y.size} values, y_score {s.size}")
    if y.all() or not y.any():
        return float("nan")
    return float(skm.roc_auc_score(y, s))


def auroc_columns(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-column AUROC of [n, k] 0/1 labels against [n, k] scores -> [k] (nan: one class only), by
    one roc_auc_score(average=None) call over the columns with both classes."""
    y, scores = np.asarray(y).astype(np.int64), np.asarray(scores, dtype=np.float64)
    out = np.full(y.shape[1], np.nan)
    both = (y.min(0) != y.max(0)) if len(y) else np.zeros(y.shape[1], bool)
    if both.sum() == 1:  # one column is a binary target to sklearn, not a multilabel one
        k = int(np.flatnonzero(both)[0])
        out[k] = skm.roc_auc_score(y[:, k], scores[:, k])
    elif both.any():
        out[both] = skm.roc_auc_score(y[:, both], scores[:, both], average=None)
    return out


def _sklearn_target(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """sklearn reads [n, k > 1] 0/1 matrices as multilabel, but one column as a binary target with
    the classes {0, 1}: score its positive class only."""
    return (y[:, 0], p[:, 0], {"labels": [1]}) if y.shape[1] == 1 else (y, p, {})


def label_metrics(reference, generated, *, uncertain: str = "negative", names: Sequence[str] = CHEXPERT_LABELS,
                  zero_division: float = 0.0, ci_samples: int = 0) -> dict:
    """Reference vs generated label matrices [n, len(names)] -> {"f1_micro", "f1_macro",
    "f1_weighted", the same for precision, recall, jaccard and auroc, "n_reports", "per_class":
    {name: {precision, recall, f1, jaccard, auroc, support, predicted}}}, each class also with
    "f1_ci" and "auroc_ci" [lower, upper] when ci_samples > 0. See the module docstring."""
    ref, gen = np.asarray(reference, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != gen.shape or ref.shape[1] != len(names):
        raise UsageError(f"reference {ref.shape} and generated {gen.shape} must both be [n, {len(names)}]")
    if not len(ref):
        raise UsageError("label metrics need at least one report")
    y, p = binarize(ref, uncertain), binarize(gen, uncertain)
    yt, pt, kw = _sklearn_target(y, p)
    out: dict = {"n_reports": int(ref.shape[0])}
    precision, recall, f1, support = skm.precision_recall_fscore_support(yt, pt, average=None,
                                                                          zero_division=zero_division, **kw)
    jaccard = skm.jaccard_score(yt, pt, average=None, zero_division=zero_division, **kw)
    for avg in ("micro", "macro", "weighted"):
        scores = skm.precision_recall_fscore_support(yt, pt, average=avg, zero_division=zero_division, **kw)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = map(float, scores[:3])
        out[f"jaccard_{avg}"] = float(skm.jaccard_score(yt, pt, average=avg, zero_division=zero_division, **kw))
    aucs = auroc_columns(y, p)
    valid = ~np.isnan(aucs)
    out["auroc_micro"] = auroc(y.ravel(), p.ravel())
    out["auroc_macro"] = float(aucs[valid].mean()) if valid.any() else float("nan")
    out["auroc_weighted"] = (float(np.average(aucs[valid], weights=support[valid])) if support[valid].sum() > 0
                             else float("nan"))
    out["per_class"] = {name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                               "jaccard": float(jaccard[k]), "auroc": float(aucs[k]), "support": int(support[k]),
                               "predicted": int(p[:, k].sum())}
                        for k, name in enumerate(names)}
    if ci_samples:
        draws = score_draws(y, p, p, resample_counts(len(y), ci_samples), zero_division)
        f1_ci, auc_ci = percentile_interval(draws["f1"]), percentile_interval(draws["auroc"])
        for k, name in enumerate(names):
            out["per_class"][name] |= {"f1_ci": f1_ci[k].tolist(), "auroc_ci": auc_ci[k].tolist()}
        head = percentile_interval(np.stack([draws[key] for key in HEADLINE_LABEL_SCORES], axis=1))
        out |= {f"{key}_ci": head[j].tolist() for j, key in enumerate(HEADLINE_LABEL_SCORES)}
    return out


HEADLINE_LABEL_SCORES = ("f1_micro", "f1_macro", "auroc_micro")  # the ones label_metrics gives intervals


# ----------------------------------------------------------------------------- text

TOKENIZERS = ("ptb", "simple", "none")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[a-z]+(?:[-'][a-z]+)*|[^\sa-z\d]")
_SENTINEL = "llmcxr end of texts"  # the last line PTB tokenizes: it comes back as itself when no line shifted


def tokenize(text: str, keep_punctuation: bool = False) -> list[str]:
    """Our tokens (tokenizer="simple", and the VQA score's): lowercase words (letters with inner
    hyphens or apostrophes: "plate-like", "can't"), numbers ("2.5") and single punctuation marks,
    dropped unless keep_punctuation; "___" is punctuation."""
    tokens = _TOKEN.findall(text.lower())
    return tokens if keep_punctuation else [t for t in tokens if t[0].isalnum()]


def check_tokenizer(tokenizer: str) -> None:
    """Fail in one line, before any generation, on a tokenizer that cannot run here."""
    if tokenizer not in TOKENIZERS:
        raise UsageError(f"tokenizer must be one of {', '.join(TOKENIZERS)}; got {tokenizer!r}")
    if tokenizer != "ptb":
        return
    if shutil.which("java") is None:
        raise UsageError("PTB tokenization (pycocoevalcap's PTBTokenizer, tokenizer='ptb') needs Java: `java` is "
                         "not on PATH; install a Java runtime, or use tokenizer='simple' (no Java; BLEU / ROUGE-L "
                         "/ CIDEr-D then not exactly comparable with published numbers)")
    folder = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    if not os.access(folder, os.W_OK):
        raise UsageError(f"pycocoevalcap's PTBTokenizer writes its input file into {folder}, which is not writable; "
                         "install pycocoevalcap into a writable environment or use tokenizer='simple'")


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer over texts, one JVM for all -> one space-joined token string each."""
    check_tokenizer("ptb")
    lines = [" ".join(t.split()) for t in texts] + [_SENTINEL]
    out = ptbtokenizer.PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(lines)})
    if len(out) != len(lines) or out.get(len(lines) - 1) != [_SENTINEL]:
        raise RuntimeError(f"PTBTokenizer returned {len(out)} of {len(lines)} lines or shifted them")
    return [out[i][0] for i in range(len(texts))]


def _tokenized(texts: Sequence[str], tokenizer: str) -> list[str]:
    if tokenizer == "ptb":
        return ptb_tokenize(texts)
    if tokenizer == "simple":
        return [" ".join(tokenize(t)) for t in texts]
    if tokenizer == "none":
        return [" ".join(t.split()) for t in texts]
    raise UsageError(f"tokenizer must be one of {', '.join(TOKENIZERS)}; got {tokenizer!r}")


def _coco_inputs(candidates: Sequence[str], references, tokenizer: str) -> tuple[dict, dict]:
    """-> (gts, res): pycocoevalcap's {id: [reference strings]} and {id: [candidate string]}, tokenized
    in one pass (one JVM for "ptb")."""
    if isinstance(candidates, str):
        raise UsageError("candidates must be a sequence of report strings, not one string")
    if len(candidates) != len(references):
        raise UsageError(f"{len(candidates)} candidates but {len(references)} reference entries")
    if not len(candidates):
        raise UsageError("text metrics need at least one candidate report")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise UsageError("every candidate needs at least one reference")
    tokens = _tokenized([*candidates, *(r for rs in refs for r in rs)], tokenizer)
    res = {i: [tokens[i]] for i in range(len(candidates))}
    gts, j = {}, len(candidates)
    for i, rs in enumerate(refs):
        gts[i], j = tokens[j:j + len(rs)], j + len(rs)
    if not any(r for rs in gts.values() for r in rs):
        raise UsageError("every reference is empty after tokenization; text metrics need reference words")
    return gts, res


def _bleu(gts: dict, res: dict, max_n: int = 4) -> dict[str, float]:
    scores, _ = Bleu(max_n).compute_score(gts, res, verbose=0)
    return {f"bleu_{k}": float(s) for k, s in enumerate(scores, 1)}


def bleu(candidates: Sequence[str], references, tokenizer: str = "ptb", max_n: int = 4) -> dict[str, float]:
    """{"bleu_1": ..., "bleu_<max_n>": ...}: pycocoevalcap's corpus BLEU-1..max_n of report strings."""
    return _bleu(*_coco_inputs(candidates, references, tokenizer), max_n)


def rouge_l(candidates: Sequence[str], references, tokenizer: str = "ptb") -> float:
    """pycocoevalcap's ROUGE-L (beta 1.2): the mean over reports."""
    score, _ = Rouge().compute_score(*_coco_inputs(candidates, references, tokenizer))
    return float(score)


def cider_d(candidates: Sequence[str], references, tokenizer: str = "ptb", per_report: bool = False):
    """pycocoevalcap's CIDEr-D of the corpus (the mean over reports), or (mean, per-report scores)
    with per_report."""
    mean, scores = Cider().compute_score(*_coco_inputs(candidates, references, tokenizer))
    return (float(mean), [float(s) for s in scores]) if per_report else float(mean)


def meteor_unavailable() -> str | None:
    """Why METEOR cannot run here, in one line, or None when it can (Java on PATH, the jar and its
    paraphrase table where pycocoevalcap installs them)."""
    if shutil.which("java") is None:
        return "Java is not on PATH (METEOR 1.5 is a Java program: install a Java runtime)"
    folder = os.path.dirname(os.path.abspath(coco_meteor.__file__))
    for need in (coco_meteor.METEOR_JAR, os.path.join("data", "paraphrase-en.gz")):
        if not os.path.isfile(os.path.join(folder, need)):
            return f"pycocoevalcap has no {os.path.join(folder, need)} (reinstall pycocoevalcap)"
    return None


def _stop_meteor(scorer) -> str:
    """End the scorer's JVM (stdin closed: the jar exits; killed if it has not within 30 s) and return
    what it wrote to stderr. The wrapper's lock is released so its __del__ cannot wait on it forever."""
    proc = scorer.meteor_p
    if proc.stdin and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except OSError:  # the JVM already died: its pipe is broken
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr and not proc.stderr.closed else ""
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()
    if scorer.lock.locked():
        scorer.lock.release()
    return err


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's Meteor().compute_score(gts, res) in a JVM of its own, closed before returning;
    RuntimeError (with the JVM's last stderr line) when the jar fails."""
    reason = meteor_unavailable()
    if reason:
        raise RuntimeError(f"METEOR cannot run: {reason}")
    scorer = coco_meteor.Meteor()
    try:
        score, scores = scorer.compute_score(gts, res)
    except (OSError, ValueError) as e:  # a broken pipe or an unreadable line: the JVM failed
        lines = _stop_meteor(scorer).strip().splitlines() or [f"{type(e).__name__}: {e}"]
        raise RuntimeError(f"METEOR 1.5 failed: {lines[-1][:200]}") from None
    finally:
        _stop_meteor(scorer)
    return float(score), [float(s) for s in scores]


def meteor(candidates: Sequence[str], references, tokenizer: str = "ptb", per_report: bool = False):
    """pycocoevalcap's METEOR 1.5 of the corpus, or (score, per-report scores) with per_report; needs
    Java (RuntimeError naming the reason otherwise)."""
    score, scores = _meteor(*_coco_inputs(candidates, references, tokenizer))
    return (score, scores) if per_report else score


def text_metrics(candidates: Sequence[str], references, tokenizer: str = "ptb", *, meteor: bool = False,
                 ci_samples: int = 0) -> dict:
    """pycocoevalcap's corpus BLEU-1..4, ROUGE-L and CIDEr-D of generated reports against references,
    the texts tokenized once ("ptb": one JVM); with meteor, METEOR too (or "meteor_not_computed": the
    reason); with ci_samples, "rouge_l_ci" and "cider_d_ci" bootstrap intervals (module docstring)."""
    gts, res = _coco_inputs(candidates, references, tokenizer)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    out: dict = {**_bleu(gts, res), "rouge_l": float(rouge), "cider_d": float(cider)}
    if meteor:
        try:
            out["meteor"] = _meteor(gts, res)[0]
        except RuntimeError as e:
            out["meteor_not_computed"] = str(e)
    if ci_samples:
        each = np.stack([np.asarray(rouge_each, np.float64), np.asarray(cider_each, np.float64)], axis=1)
        ci = bootstrap_interval(lambda i: each[i].mean(0), len(each), samples=ci_samples)
        out |= {"rouge_l_ci": ci[0].tolist(), "cider_d_ci": ci[1].tolist()}
    return out
