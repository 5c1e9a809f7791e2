"""A small CNN the project trains itself on the synthetic corpus (14 CheXpert outputs): its AUROC
on images generated from reports measures report->CXR faithfulness, and its penultimate-layer
features give an FID where no torchxrayvision weights are at hand. Positive = label 1.0; -1 and blank = 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import save_file

from llmcxr_jax import user_files
from llmcxr_jax.data import images as image_io
from llmcxr_jax.data import mimic_cxr
from llmcxr_jax.errors import MissingInputError, UsageError


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 64
    widths: tuple[int, ...] = (16, 32, 64, 64)
    hidden: int = 64  # width of the feature layer between the flattened last stage and the head
    num_labels: int = len(mimic_cxr.CHEXPERT_LABELS)


class CxrClassifier(nnx.Module):
    """conv3x3-relu-avgpool stages on a grey image, the last stage flattened (findings are
    positional: which side, how wide the heart), a relu feature layer, a linear head."""

    def __init__(self, cfg: ClassifierConfig, rngs: nnx.Rngs):
        chans = (1,) + tuple(cfg.widths)
        self.convs = nnx.List([nnx.Conv(chans[i], chans[i + 1], (3, 3), rngs=rngs) for i in range(len(cfg.widths))])
        side = cfg.image_size >> len(cfg.widths)
        if side < 1 or side << len(cfg.widths) != cfg.image_size:
            raise UsageError(f"image_size {cfg.image_size} does not halve {len(cfg.widths)} times; give a multiple "
                             f"of {2 ** len(cfg.widths)} or fewer widths")
        self.hidden = nnx.Linear(chans[-1] * side * side, cfg.hidden, rngs=rngs)
        self.head = nnx.Linear(cfg.hidden, cfg.num_labels, rngs=rngs)

    def features(self, x):  # [b, H, W, 1] in [-1, 1] -> [b, hidden]
        for conv in self.convs:
            x = nnx.avg_pool(jax.nn.relu(conv(x)), (2, 2), (2, 2))
        return jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))

    def __call__(self, x):  # -> logits [b, num_labels]
        return self.head(self.features(x))


def targets_for(records: Sequence, labels: dict) -> np.ndarray:
    """[n, 14] float32 with 1 where the study's label is 1.0 (uncertain and blank count as 0)."""
    out = np.zeros((len(records), len(mimic_cxr.CHEXPERT_LABELS)), np.float32)
    for i, r in enumerate(records):
        row = labels.get((r.subject_id, r.study_id), {})
        out[i] = [1.0 if row.get(name) == 1.0 else 0.0 for name in mimic_cxr.CHEXPERT_LABELS]
    return out


def load_images(records: Sequence, size: int) -> np.ndarray:
    return np.stack([image_io.load_image(r.image_path, size, 1) for r in records])


def train_classifier(images: np.ndarray, targets: np.ndarray, cfg: ClassifierConfig = ClassifierConfig(), *,
                     steps: int = 300, batch: int = 32, lr: float = 2e-3, seed: int = 0) -> CxrClassifier:
    """Adam on the mean binary cross-entropy; batches drawn by a seeded permutation per epoch."""
    model = CxrClassifier(cfg, nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.sigmoid_binary_cross_entropy(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(len(images)), 0
    for _ in range(steps):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(images)), 0
        idx = order[pos:pos + batch]
        pos += batch
        step(model, opt, jnp.asarray(images[idx]), jnp.asarray(targets[idx]))
    return model


@nnx.jit
def _probs_and_features(model: CxrClassifier, x):
    return jax.nn.sigmoid(model(x)), model.features(x)


def predict(model: CxrClassifier, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """-> (probabilities [n, 14], feature-layer activations [n, hidden])."""
    probs, feats = [], []
    for i in range(0, len(images), batch):
        p, f = _probs_and_features(model, jnp.asarray(images[i:i + batch]))
        probs.append(np.asarray(p))
        feats.append(np.asarray(f))
    return np.concatenate(probs), np.concatenate(feats)


def save_classifier(model: CxrClassifier, cfg: ClassifierConfig, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    flat = {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    save_file(flat, os.path.join(directory, "classifier.safetensors"))
    with open(os.path.join(directory, "classifier.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f)


def load_classifier(directory: str) -> tuple[CxrClassifier, ClassifierConfig]:
    path = os.path.join(directory, "classifier.safetensors")
    if not os.path.isfile(path):
        raise MissingInputError(f"{directory} holds no classifier.safetensors; train one with train_classifier")
    cfg_path = os.path.join(directory, "classifier.json")
    raw = user_files.read_json_object(cfg_path, "classifier config", ("widths",))
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(ClassifierConfig)})
    if unknown or not isinstance(raw["widths"], list):
        raise UsageError(f"classifier config {cfg_path} is not one save_classifier wrote (bad keys: "
                         f"{unknown or ['widths']})")
    cfg = ClassifierConfig(**{**raw, "widths": tuple(raw["widths"])})
    model = CxrClassifier(cfg, nnx.Rngs(0))
    arrays = user_files.load_safetensors(path, "classifier weights")
    state = nnx.state(model, nnx.Param)
    for key, var in nnx.to_flat_state(state):
        name = "/".join(map(str, key))
        if name not in arrays:
            raise UsageError(f"{path} lacks {name}")
        var.set_value(jnp.asarray(arrays[name]))
    nnx.update(model, state)
    return model, cfg
