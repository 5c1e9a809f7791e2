"""Scores `llmcxr evaluate` computes from arrays alone: a CXR classifier's AUROC / F1 on images against the
reference reports' labels (per finding, micro / macro, with bootstrap intervals), and the chance baselines
written beside every number (a random report, a constant classifier, the most frequent VQA answer).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from llmcxr_jax.data import mimic_cxr
from llmcxr_jax.eval import vqa_metrics
from llmcxr_jax.eval.bootstrap import percentile_interval, resample_counts, score_draws
from llmcxr_jax.eval.report_metrics import auroc, auroc_columns, binarize

CLASSIFIER_HEADLINE = ("auroc_micro", "auroc_macro", "f1_micro", "f1_macro")  # the scores given intervals
F1_THRESHOLD = 0.5  # a finding is positive at probability >= 0.5 (torchxrayvision's op_threshs calibration
#                     puts each finding's operating point there; our classifier's output is a sigmoid)


def classifier_scores(probs: np.ndarray, reference: np.ndarray, ci_samples: int = 0) -> dict:
    """A classifier's probabilities [n, 14] (CheXpert order; a nan column: a finding it does not
    predict) against reference labels (positive = 1) -> AUROC (sklearn) and F1 (positive at >=
    F1_THRESHOLD) per finding, and micro (pooled over the findings it predicts) / macro (their mean;
    AUROC over those with both classes present). With ci_samples > 0: 95% percentile-bootstrap
    intervals over images for each finding's AUROC ("auroc_ci") and CLASSIFIER_HEADLINE ("<name>_ci")."""
    y = binarize(reference).astype(bool)
    probs = np.asarray(probs, np.float64)
    scored = ~np.isnan(probs).any(axis=0)
    ys, ps = y[:, scored], probs[:, scored]
    predicted = ps >= F1_THRESHOLD
    tp, fp, fn = (ys & predicted).sum(0), (~ys & predicted).sum(0), (ys & ~predicted).sum(0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=2 * tp + fp + fn > 0)
    aucs = auroc_columns(ys, ps)
    valid = aucs[~np.isnan(aucs)]
    pooled = 2 * tp.sum() + fp.sum() + fn.sum()
    out: dict = {"auroc_micro": auroc(ys.ravel(), ps.ravel()),
                 "auroc_macro": float(valid.mean()) if valid.size else float("nan"),
                 "f1_micro": float(2 * tp.sum() / pooled) if pooled else 0.0,
                 "f1_macro": float(f1.mean()) if f1.size else float("nan"), "f1_threshold": F1_THRESHOLD,
                 "per_class": {}}
    column = np.cumsum(scored) - 1  # a scored finding's column in ys
    for j, name in enumerate(mimic_cxr.CHEXPERT_LABELS):
        out["per_class"][name] = ({"auroc": float(aucs[column[j]]), "f1": float(f1[column[j]])} if scored[j] else
                                  {"auroc": float("nan"), "f1": float("nan"), "not_predicted": True})
        out["per_class"][name]["support"] = int(y[:, j].sum())
    if ci_samples and scored.any():
        draws = score_draws(ys, ps, predicted, resample_counts(len(y), ci_samples))
        per = percentile_interval(draws["auroc"])
        for j, name in enumerate(mimic_cxr.CHEXPERT_LABELS):
            out["per_class"][name]["auroc_ci"] = per[column[j]].tolist() if scored[j] else [float("nan")] * 2
        head = percentile_interval(np.stack([draws[key] for key in CLASSIFIER_HEADLINE], axis=1))
        out |= {f"{key}_ci": head[i].tolist() for i, key in enumerate(CLASSIFIER_HEADLINE)}
    return out


def chance_label_metrics(reference: np.ndarray) -> dict:
    """Expected label scores of a random report whose labels are positive with the reference
    prevalence p_k, independently of the image: per class F1 = precision = recall = p_k and AUROC
    0.5; pooled over classes (micro) TPR = F1 = sum p_k^2 / sum p_k and FPR = sum p_k (1 - p_k) /
    sum (1 - p_k), so micro AUROC = (1 + TPR - FPR) / 2, above 0.5 when prevalences differ."""
    p = binarize(reference).mean(0) if len(reference) else np.zeros(reference.shape[1])
    names = mimic_cxr.CHEXPERT_LABELS
    tpr = float((p ** 2).sum() / p.sum()) if p.sum() > 0 else 0.0
    fpr = float((p * (1 - p)).sum() / (1 - p).sum()) if (1 - p).sum() > 0 else 0.0
    return {"f1_micro": tpr, "f1_macro": float(p.mean()), "auroc_micro": (1 + tpr - fpr) / 2, "auroc_macro": 0.5,
            "per_class": {n: {"f1": float(p[k]), "auroc": 0.5, "prevalence": float(p[k])} for k, n in enumerate(names)}}


def chance_classifier_scores(reference: np.ndarray, predicts: np.ndarray | None = None) -> dict:
    """Scores of a classifier that ignores the image: its AUROC that of a constant output (0.5 per
    class; micro above 0.5 when prevalences differ, classes being pooled), its F1 that of a random
    positive with each class's reference prevalence p_k (per class p_k, micro sum p_k^2 / sum p_k,
    macro their mean), over the findings in `predicts` ([14] bool; default all)."""
    prevalence = binarize(reference).mean(0)
    predicts = np.ones(len(prevalence), bool) if predicts is None else np.asarray(predicts, bool)
    probs = np.where(predicts, prevalence, np.nan)
    out = classifier_scores(np.broadcast_to(probs, reference.shape), reference)
    p = prevalence[predicts]
    out |= {"f1_micro": float((p ** 2).sum() / p.sum()) if p.sum() > 0 else 0.0,
            "f1_macro": float(p.mean()) if p.size else float("nan")}
    for j, name in enumerate(mimic_cxr.CHEXPERT_LABELS):
        if predicts[j]:
            out["per_class"][name]["f1"] = float(prevalence[j])
    return out


def most_frequent_answers(references: Sequence[str], kinds: Sequence[str | None]) -> list[str]:
    """Per question type, its most frequent normalised reference answer (the VQA chance baseline)."""
    counts: dict = {}
    for r, k in zip(references, kinds):
        counts.setdefault(k, Counter())[" ".join(vqa_metrics.normalise(r))] += 1
    top = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    return [top[k] for k in kinds]
