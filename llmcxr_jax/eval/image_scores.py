"""The networks `llmcxr evaluate` scores report->CXR with, loaded once before anything is generated (a bad
file fails first): our CXR classifier (--classifier), torchxrayvision's DenseNet classifier and features
(--txv-weights) and the FID Inception (--inception-weights); and what they make of the generated images
beside the real images and their VQ-GAN reconstructions.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llmcxr_jax import user_files
from llmcxr_jax.convert import perceptual_weights
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.eval import cxr_classifier, image_metrics
from llmcxr_jax.eval.inception_fid import InceptionFID, load_inception
from llmcxr_jax.eval.scores import chance_classifier_scores, classifier_scores
from llmcxr_jax.eval.txv_classifier import TxvClassifier, load_txv_classifier
from llmcxr_jax.models.perceptual import cip_preprocess

IMAGE_SETS = ("", "_real", "_reconstructed")  # metrics.json suffixes: generated, real, VQ-GAN reconstructions


def gray(images: np.ndarray, size: int) -> np.ndarray:
    """[n, H, W, C] images in [-1, 1] -> [n, size, size, 1] (channel mean, antialiased resize)."""
    x = jnp.asarray(images, jnp.float32).mean(axis=-1, keepdims=True)
    if x.shape[1] != size:
        x = jax.image.resize(x, (x.shape[0], size, size, 1), "bilinear", antialias=True)
    return np.asarray(x)


def is_txv_classifier(path: str) -> bool:
    """Whether a `convert-weights txv` file holds the whole classifier (--classifier), not only the
    DenseNet features; both serve FID on txv features."""
    from safetensors import SafetensorError, safe_open

    user_files.check_safetensors(path, "--txv-weights")
    try:
        with safe_open(path, "numpy") as f:
            return (f.metadata() or {}).get("format") == perceptual_weights.CLASSIFIER_FORMAT
    except SafetensorError as e:
        raise UsageError(f"--txv-weights {path} is not a safetensors file ({e}); give a `llmcxr convert-weights "
                         "txv` output") from None


def _txv_features(path: str) -> Callable[[np.ndarray], np.ndarray]:
    net = perceptual_weights.load_txv_densenet(path, dtype="float32", param_dtype="float32")
    fn = jax.jit(lambda x: net.features(cip_preprocess(x)))
    return lambda x: np.asarray(fn(jnp.asarray(x)))


@dataclasses.dataclass
class ImageNetworks:
    """The scoring networks an evaluation was given; None where its flag was not."""

    classifier: tuple[cxr_classifier.CxrClassifier, cxr_classifier.ClassifierConfig] | None = None
    txv_classifier: TxvClassifier | None = None
    txv_features: Callable[[np.ndarray], np.ndarray] | None = None
    inception: InceptionFID | None = None

    @classmethod
    def load(cls, classifier: str = "", txv_weights: str = "", inception_weights: str = "") -> ImageNetworks:
        """Load what is given; a missing file is a one-line error naming its flag and path."""
        for flag, path in (("--txv-weights", txv_weights), ("--inception-weights", inception_weights)):
            if path and not os.path.isfile(path):
                raise MissingInputError(f"{flag} {path} does not exist; give the converted weights file or leave "
                                        f"out {flag}")
        nets = cls()
        if classifier:
            nets.classifier = cxr_classifier.load_classifier(classifier)
        if txv_weights:
            nets.txv_features = _txv_features(txv_weights)
            if is_txv_classifier(txv_weights):
                nets.txv_classifier = load_txv_classifier(txv_weights)
        if inception_weights:
            nets.inception = load_inception(inception_weights)
        return nets


def _fid(name: str, real: np.ndarray, fake: np.ndarray, scores: dict) -> None:
    """scores[name] = FID of two feature sets, or scores[name + "_not_computed"]: why not (too few
    images, or a covariance root FID cannot use)."""
    try:
        scores[name] = image_metrics.fid(real, fake)
    except ValueError as e:  # UsageError (fewer than 2 images) is a ValueError too
        scores[f"{name}_not_computed"] = str(e)


def score_images(nets: ImageNetworks, real: np.ndarray, fake: np.ndarray, reconstructions: Callable[[], np.ndarray],
                 labels: np.ndarray, ci_samples: int = 0, progress: bool = False) -> tuple[dict, dict]:
    """-> (scores for metrics.json's "image", their chance baselines). Each classifier scores the
    generated images, the real ones and their reconstructions against the reference labels
    (scores.classifier_scores); FIDs compare generated with real images."""
    scores: dict = {}
    baselines: dict = {}
    if nets.classifier or nets.txv_classifier:
        sets = dict(zip(IMAGE_SETS, (fake, real, reconstructions())))
    if nets.classifier:
        model, cfg = nets.classifier
        features = {}
        for suffix, images in sets.items():
            probs, features[suffix] = cxr_classifier.predict(model, gray(images, cfg.image_size))
            scores[f"classifier{suffix}"] = classifier_scores(probs, labels, ci_samples)
        _fid("fid_classifier", features["_real"], features[""], scores)
        baselines["classifier"] = chance_classifier_scores(labels)
    if nets.txv_classifier:
        for suffix, images in sets.items():
            probs = nets.txv_classifier.predict(images).probabilities
            scores[f"txv_classifier{suffix}"] = classifier_scores(probs, labels, ci_samples)
        baselines["txv_classifier"] = chance_classifier_scores(labels, np.asarray(nets.txv_classifier.available))
    if nets.txv_features:
        _fid("fid_txv", image_metrics.features_in_batches(nets.txv_features, real, 8),
             image_metrics.features_in_batches(nets.txv_features, fake, 8), scores)
    if nets.inception:
        _fid("fid_inception", nets.inception.features(real, progress=progress),
             nets.inception.features(fake, progress=progress), scores)
    return scores, baselines
