"""Percentile-bootstrap intervals over evaluated items (reports, images, questions). Every interval
draws the same resamples for a seed: `samples` draws of n indices with replacement. Label and
classifier scores are computed for all resamples at once from how often each item was drawn
(`resample_counts`): F1 from weighted confusion counts, AUROC as the weighted Mann-Whitney statistic
(ties count one half), which is what sklearn computes on the resampled rows (tests check both).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmcxr_jax.errors import UsageError

_CHUNK = 64  # resamples scored together: bounds memory at ~_CHUNK x items x 8 bytes per array


def _draws(n: int, samples: int, level: float, seed: int) -> np.ndarray:
    if n < 1 or samples < 1 or not 0 < level < 1:
        raise UsageError(f"a bootstrap needs n >= 1 items, samples >= 1 and 0 < level < 1; got {n}, {samples}, {level}")
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def percentile_interval(values: np.ndarray, level: float = 0.95) -> np.ndarray:
    """[samples, k] statistics of the resamples -> [k, 2] (lower, upper) percentiles at `level`; nan
    draws left out, nan where every draw is nan."""
    values = np.asarray(values, np.float64)
    tail = 100 * (1 - level) / 2
    out = np.full((values.shape[1], 2), np.nan)
    for k in range(values.shape[1]):
        v = values[:, k][~np.isnan(values[:, k])]
        if v.size:
            out[k] = np.percentile(v, [tail, 100 - tail])
    return out


def bootstrap_interval(statistic: Callable[[np.ndarray], object], n: int, *, samples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> np.ndarray:
    """Percentile bootstrap of `statistic(idx) -> [k]` over n items: `samples` draws of n indices
    with replacement -> [k, 2] (lower, upper) bounds at `level`; nan where every draw gave nan."""
    idx = _draws(n, samples, level, seed)
    return percentile_interval(np.stack([np.asarray(statistic(i), dtype=np.float64) for i in idx]), level)


def resample_counts(n: int, samples: int = 1000, seed: int = 0) -> np.ndarray:
    """[samples, n]: how often each item is in each resample of bootstrap_interval (the same draws)."""
    idx = _draws(n, samples, 0.95, seed)
    counts = np.zeros((samples, n), np.float64)
    np.add.at(counts, (np.arange(samples)[:, None], idx), 1.0)
    return counts


def weighted_auroc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray, items: np.ndarray | None = None
                   ) -> np.ndarray:
    """AUROC of [m] 0/1 labels against [m] scores under [s, n] item weights -> [s]: the weighted share
    of (positive, negative) pairs the scores order right, ties counting one half; nan where a
    resample has no positive or no negative. items[j]: the weights column of entry j (default j)."""
    y = np.asarray(y, bool)
    order = np.argsort(scores, kind="stable")
    y, sorted_scores = y[order], np.asarray(scores, np.float64)[order]
    columns = order if items is None else np.asarray(items)[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # one group per tied score
    out = np.empty(len(weights))
    for c in range(0, len(weights), _CHUNK):
        w = weights[c:c + _CHUNK][:, columns]
        pos = np.add.reduceat(w * y, starts, axis=1)  # [chunk, groups]
        neg = np.add.reduceat(w * ~y, starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negative weight under each group's score
        right = (pos * (below + 0.5 * neg)).sum(1)
        total = pos.sum(1) * neg.sum(1)
        out[c:c + _CHUNK] = np.divide(right, total, out=np.full(len(w), np.nan), where=total > 0)
    return out


def score_draws(y: np.ndarray, scores: np.ndarray, predicted: np.ndarray, weights: np.ndarray,
                zero_division: float = 0.0) -> dict[str, np.ndarray]:
    """Per-resample scores of [n, k] 0/1 labels against [n, k] scores and their 0/1 predictions, under
    [s, n] item weights -> {"f1": [s, k], "auroc": [s, k], "f1_micro", "f1_macro", "auroc_micro",
    "auroc_macro": [s]}. F1 = 2 tp / (2 tp + fp + fn) (zero_division where nothing is positive);
    micro pools the (item, finding) pairs; macro AUROC is the mean over findings with both classes."""
    y, predicted, scores = np.asarray(y, bool), np.asarray(predicted, bool), np.asarray(scores, np.float64)
    tp, fp, fn = (weights @ (a & b) for a, b in ((y, predicted), (~y, predicted), (y, ~predicted)))
    f1 = _f1(tp, fp, fn, zero_division)
    auroc = np.stack([weighted_auroc(y[:, j], scores[:, j], weights) for j in range(y.shape[1])], axis=1)
    valid = ~np.isnan(auroc)
    pooled = np.repeat(np.arange(y.shape[0]), y.shape[1])  # the item of each pair of y.ravel()
    return {"f1": f1, "auroc": auroc, "f1_micro": _f1(tp.sum(1), fp.sum(1), fn.sum(1), zero_division),
            "f1_macro": f1.mean(1), "auroc_micro": weighted_auroc(y.ravel(), scores.ravel(), weights, pooled),
            "auroc_macro": np.divide(np.where(valid, auroc, 0).sum(1), valid.sum(1),
                                     out=np.full(len(weights), np.nan), where=valid.sum(1) > 0)}


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, zero_division: float) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.full(np.shape(tp), float(zero_division)), where=denominator > 0)
