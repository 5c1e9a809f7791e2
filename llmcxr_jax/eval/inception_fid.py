"""Inception FID as torch-fidelity and pytorch-fid compute it (the paper's "FID Inception"): images in
[-1, 1] -> the uint8 pixels a saved PNG holds -> the FID Inception-v3's pool3 features (jitted, fixed-size
batches) -> image_metrics.fid. Weights: the user's torch-fidelity weights file, never downloaded.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llmcxr_jax.convert.inception_weights import load_inception_model
from llmcxr_jax.data.images import to_uint8
from llmcxr_jax.errors import UsageError
from llmcxr_jax.eval import image_metrics
from llmcxr_jax.models.inception import POOL3_FEATURES, InceptionV3


class InceptionFID:
    """The FID Inception with its weights, split once and jitted once per input shape."""

    def __init__(self, model: InceptionV3):
        graphdef, state = nnx.split(model)
        self._state = state

        @jax.jit
        def pool3(state, pixels):  # uint8 [b, H, W, 1 or 3] -> float32 [b, 2048]
            rgb = jnp.broadcast_to(pixels, pixels.shape[:3] + (3,)).astype(jnp.float32)  # grey -> RGB
            return nnx.merge(graphdef, state)(rgb)

        self._pool3 = pool3

    def features(self, images: np.ndarray, batch: int = 32, progress: bool = False) -> np.ndarray:
        """images float [n, H, W, 3 or 1] in [-1, 1] -> pool3 features float64 [n, 2048].

        Pixels are rounded to uint8 first (data.images.to_uint8, as a saved PNG holds them), since
        torch-fidelity takes uint8 images; grey images are repeated to RGB, as PIL's convert('RGB')
        does. Every batch has min(batch, n) images (the last one padded), so one compile serves all."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
            raise UsageError(f"Inception FID takes images [n, H, W, 1 or 3] in [-1, 1] with n >= 1, got shape "
                             f"{images.shape}")
        if batch < 1:
            raise UsageError(f"Inception FID batch must be >= 1, got {batch}")
        n = len(images)
        size = min(batch, n)
        out = np.empty((n, POOL3_FEATURES), np.float64)
        with tqdm(total=n, desc="Inception features", unit="image", file=sys.stderr, disable=not progress,
                  mininterval=2.0) as bar:
            for start in range(0, n, size):
                chunk = to_uint8(images[start:start + size])
                real = len(chunk)
                if real < size:
                    chunk = np.concatenate([chunk, np.zeros((size - real,) + chunk.shape[1:], np.uint8)])
                out[start:start + real] = np.asarray(self._pool3(self._state, chunk))[:real]
                bar.update(real)
        return out

    def fid(self, real: np.ndarray, fake: np.ndarray, batch: int = 32, progress: bool = False) -> float:
        """Inception FID between two image sets, each [n, H, W, 1 or 3] in [-1, 1] with n >= 2."""
        return image_metrics.fid(self.features(real, batch, progress), self.features(fake, batch, progress))


def load_inception(path: str) -> InceptionFID:
    """InceptionFID from torch-fidelity's weights-inception-2015-12-05-6726825d.pth at `path`; a missing
    file is a MissingInputError naming it, a wrong state dict a UsageError naming the keys."""
    return InceptionFID(load_inception_model(path))
