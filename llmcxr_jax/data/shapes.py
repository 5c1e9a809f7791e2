"""Generated grey-level shape images: a deterministic stand-in image source (image i depends
only on (seed, i)), so VQ-GAN training can run, resume and be tested before any CXR exists.
"""
from __future__ import annotations

import numpy as np


def shape_image(seed: int, index: int, size: int, channels: int) -> np.ndarray:
    """One [size, size, channels] float32 image in [-1, 1]: a smooth background and 1-4
    ellipses or rectangles of random grey levels."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    img = 0.3 * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(-0.6, 0.0)
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(0.15, 0.85, 2)
        ry, rx = rng.uniform(0.06, 0.3, 2)
        level = rng.uniform(-0.8, 0.9)
        if rng.random() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        img = np.where(inside, level, img)
    img = np.clip(img, -1.0, 1.0).astype(np.float32)
    return np.repeat(img[..., None], channels, axis=-1)
