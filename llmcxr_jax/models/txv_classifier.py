"""torchxrayvision's DenseNet pathology classifier in Flax NNX: the DenseNet features of
models/perceptual.py, its `classifier` Linear and the op_threshs calibration (xrv.models.op_norm),
plus the pathology names and operating points torchxrayvision publishes with its DenseNet-121 weights.
Weight files: convert/perceptual_weights.py; CheXpert-ordered predictions: eval/txv_classifier.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.dtypes import DTYPES
from llmcxr_jax.models.perceptual import DenseNet, DenseNetConfig, _full

# xrv.datasets.default_pathologies (torchxrayvision 1.5.7) = xrv.models.DenseNet.targets: the order
# of the classifier's outputs. Weights trained on fewer datasets name '' where they predict nothing.
TXV_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
    "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
    "Lung Opacity", "Enlarged Cardiomediastinum")

NAN = float("nan")
# op_threshs of xrv.models.model_urls (torchxrayvision 1.5.7) per DenseNet-121 weights name, in
# TXV_PATHOLOGIES order: xrv sets them (and the labels) from the name, not from the weights file.
# NaN exactly where the weights' label is '' (tests/test_txv_classifier.py checks both against xrv).
RELEASED_OP_THRESHS: dict[str, tuple[float, ...]] = {
    "densenet121-res224-all": (
        0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724, 0.103246614,
        0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766, 0.053369623, 0.035975814,
        0.20204692, 0.05015312),
    "densenet121-res224-nih": (
        0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932, 0.012037827, 0.038744126,
        0.0037213727, 0.014730946, 0.016149804, 0.054241467, 0.037198864, 0.0004403434, NAN, NAN, NAN, NAN),
    "densenet121-res224-pc": (
        0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257, 0.0023071, 0.055412333,
        0.044385884, 0.042766232, 0.043258056, 0.037629247, 0.005658899, 0.0091741895, NAN, 0.026507627, NAN, NAN),
    "densenet121-res224-chex": (
        0.1988969, 0.05710573, NAN, 0.0531293, 0.1435217, NAN, NAN, 0.27212676, 0.07749717, NAN, 0.19712369, NAN,
        NAN, NAN, 0.09932402, 0.09273402, 0.3270967, 0.10888247),
    "densenet121-res224-rsna": (
        NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 0.13486601, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 0.13511065, NAN),
    "densenet121-res224-mimic_nb": (
        0.08558747, 0.011884617, NAN, 0.0040595434, 0.010733786, NAN, NAN, 0.118761964, 0.022924708, NAN, 0.06358637,
        NAN, NAN, NAN, 0.022143636, 0.017476924, 0.1258702, 0.014020768),
    "densenet121-res224-mimic_ch": (
        0.09121389, 0.010573786, NAN, 0.005023008, 0.003698257, NAN, NAN, 0.08001232, 0.037242252, NAN, 0.05006329,
        NAN, NAN, NAN, 0.019866971, 0.03823637, 0.11303808, 0.0069147074),
}


def released_weights(name: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(labels, op_threshs float32) torchxrayvision gives DenseNet(weights=name); '' / NaN where
    those weights predict nothing."""
    if name not in RELEASED_OP_THRESHS:
        raise UsageError(f"unknown torchxrayvision DenseNet weights {name!r}; use one of "
                         f"{', '.join(RELEASED_OP_THRESHS)}")
    threshs = np.asarray(RELEASED_OP_THRESHS[name], np.float32)  # torch.tensor(list) is float32
    return tuple("" if np.isnan(t) else p for p, t in zip(TXV_PATHOLOGIES, threshs)), threshs


def op_norm(probs: jax.Array, op_threshs: jax.Array) -> jax.Array:
    """xrv.models.op_norm: sigmoid outputs [b, P] rescaled piecewise-linearly so each threshold maps
    to 0.5 (p / 2t below it, 1 - (1 - p) / 2(1 - t) at or above it); 0.5 where the threshold is NaN."""
    t = op_threshs.astype(jnp.float32)[None, :]
    known = ~jnp.isnan(t)
    t = jnp.where(known, t, 0.5)  # no NaN inside the branches either
    below = probs / (t * 2)
    above = 1.0 - ((1.0 - probs) / ((1 - t) * 2))
    return jnp.where(known, jnp.where(probs < t, below, above), 0.5)


class Buffer(nnx.Variable):
    """A torch buffer that is neither a parameter nor a batch statistic (op_threshs)."""


class Linear(nnx.Module):
    """torch Linear: kernel [in, out] (torch's weight transposed), bias [out]; float32 math."""

    def __init__(self, c_in: int, c_out: int, cfg: DenseNetConfig, rngs: nnx.Rngs | None):
        w = DTYPES[cfg.param_dtype]
        bound = c_in ** -0.5  # torch's default Linear weight init; xrv zeroes the bias
        kernel = (_full((c_in, c_out), 0.0, w) if rngs is None else
                  jax.random.uniform(rngs.params(), (c_in, c_out), w, -bound, bound))
        self.kernel = nnx.Param(kernel, logical_axes=("conv_in", "conv_out"))  # replicated, as the trunk
        self.bias = nnx.Param(_full((c_out,), 0.0, w), logical_axes=("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[b, in] -> float32 [b, out]."""
        y = jnp.dot(x.astype(jnp.float32), self.kernel.get_value().astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
        return y + self.bias.get_value().astype(jnp.float32)


class DenseNetClassifier(DenseNet):
    """xrv.models.DenseNet with its head: attribute paths are its state-dict keys, less `features.`
    for the trunk (conv0, denseblock1...), plus classifier.{kernel,bias} and op_threshs. op_threshs
    0.5 everywhere is the identity calibration (what a random init holds)."""

    def __init__(self, cfg: DenseNetConfig, num_classes: int, rngs: nnx.Rngs | None):
        if num_classes < 1:
            raise UsageError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(cfg, rngs)
        self.num_classes = num_classes
        self.classifier = Linear(cfg.num_features, num_classes, cfg, rngs)
        self.op_threshs = Buffer(_full((num_classes,), 0.5, jnp.float32), logical_axes=("norm",))

    def logits(self, x: jax.Array) -> jax.Array:
        """[b, H, W, in_channels] in [-1024, 1024] -> classifier outputs, float32 [b, num_classes]."""
        return self.classifier(self.features(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        """xrv DenseNet.forward with op_threshs set: op_norm(sigmoid(logits)), float32 [b, num_classes]."""
        return op_norm(jax.nn.sigmoid(self.logits(x)), self.op_threshs.get_value())
