"""torchxrayvision's DenseNet classifier on evaluation images (the paper's report->CXR AUROC / F1):
load a `llmcxr convert-weights txv --classifier` file, run it as xrv's DenseNet.forward does
(op_threshs calibration included) and give probabilities in the CheXpert 14 order, NaN for the
findings the weights do not predict.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llmcxr_jax.convert.perceptual_weights import load_txv_classifier_model
from llmcxr_jax.data.mimic_cxr import CHEXPERT_LABELS
from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.perceptual import cip_preprocess, frozen_apply
from llmcxr_jax.models.txv_classifier import DenseNetClassifier

# CheXpert finding -> torchxrayvision pathology. xrv's CheXpert and MIMIC-CXR datasets rename
# "Pleural Effusion" to "Effusion" and keep the other names; No Finding, Pleural Other and Support
# Devices are none of its outputs, so they stay missing.
CHEXPERT_TO_TXV: dict[str, str | None] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
    "Edema": "Edema", "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum", "Fracture": "Fracture",
    "Lung Lesion": "Lung Lesion", "Lung Opacity": "Lung Opacity", "No Finding": None,
    "Pleural Effusion": "Effusion", "Pleural Other": None, "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "Support Devices": None}


def chexpert_columns(targets: tuple[str, ...], op_threshs: np.ndarray) -> tuple[int | None, ...]:
    """For each CheXpert finding (CHEXPERT_LABELS order), the classifier output that predicts it, or
    None where the weights name no such pathology ('' target) or hold no threshold for it (NaN: xrv
    then outputs a constant 0.5)."""
    index = {name: i for i, name in enumerate(targets) if name and not np.isnan(op_threshs[i])}
    return tuple(index.get(CHEXPERT_TO_TXV[f]) if CHEXPERT_TO_TXV[f] else None for f in CHEXPERT_LABELS)


class TxvPredictions(NamedTuple):
    probabilities: np.ndarray  # [n, 14] float32 in CheXpert order; NaN columns for missing findings
    findings: tuple[str, ...]  # CHEXPERT_LABELS


class TxvClassifier:
    """A converted torchxrayvision DenseNet classifier, jitted once per image shape.

    targets: each output's pathology ('' where the weights predict nothing); findings: CHEXPERT_LABELS;
    available[i]: whether findings[i] has an output (missing: the names that do not)."""

    def __init__(self, model: DenseNetClassifier, targets: tuple[str, ...], batch_size: int = 8):
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.targets, self.findings, self.batch_size = tuple(targets), CHEXPERT_LABELS, batch_size
        self.columns = chexpert_columns(self.targets, np.asarray(model.op_threshs.get_value()))
        self.available = tuple(c is not None for c in self.columns)
        self.missing = tuple(f for f, ok in zip(self.findings, self.available) if not ok)
        apply, self._state = frozen_apply(model, "__call__")
        self._fn = jax.jit(lambda state, x: apply(state, cip_preprocess(x)))

    def predict_targets(self, images: np.ndarray) -> np.ndarray:
        """[n, H, W, C] images in [-1, 1] (C = 1 or 3, square) -> xrv's DenseNet outputs for them:
        float32 [n, len(targets)] in target order. The images go to torchxrayvision's input as
        cip_preprocess takes them: channel mean, antialiased bilinear resize to 224, x 1024."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
            raise UsageError(f"the torchxrayvision classifier takes square [n, H, W, 1 or 3] images, got "
                             f"{images.shape}")
        b, out = self.batch_size, []
        for start in range(0, len(images), b):
            chunk = images[start:start + b]
            pad = b - len(chunk)  # the last batch padded to the same shape: one compile
            x = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)]) if pad else chunk
            out.append(np.asarray(self._fn(self._state, jnp.asarray(x)))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, len(self.targets)), np.float32)

    def predict(self, images: np.ndarray) -> TxvPredictions:
        """[n, H, W, C] images in [-1, 1] -> (probabilities [n, 14] in CheXpert order, NaN columns
        for the findings the weights lack; the 14 finding names)."""
        raw = self.predict_targets(images)
        probs = np.full((len(raw), len(self.findings)), np.nan, np.float32)
        for j, col in enumerate(self.columns):
            if col is not None:
                probs[:, j] = raw[:, col]
        return TxvPredictions(probs, self.findings)


def load_txv_classifier(path: str, batch_size: int = 8) -> TxvClassifier:
    """The classifier `llmcxr convert-weights txv --classifier` wrote to path (float32); a missing
    file is a one-line MissingInputError naming it."""
    model, targets = load_txv_classifier_model(path, dtype="float32", param_dtype="float32")
    return TxvClassifier(model, targets, batch_size)
