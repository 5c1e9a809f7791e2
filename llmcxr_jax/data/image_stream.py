"""Deterministic image streams for VQ-GAN training: image i of a run depends only on (seed, i),
so a resumed run sees exactly the images an uninterrupted one would. Sources: generated shapes,
or the CXR files of a MIMIC-CXR-JPG-layout root (the synthetic corpus included).
"""
from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Sequence

import numpy as np

from llmcxr_jax.data import images as image_io
from llmcxr_jax.data.shapes import shape_image
from llmcxr_jax.errors import UsageError

# Held-out images come from a different stream than any training index can reach.
EVAL_SEED_OFFSET = 1_000_003


class ShapeStream:
    """Generated grey-level shapes; the held-out set uses another seed."""

    def __init__(self, seed: int, size: int, channels: int):
        self.seed, self.size, self.channels = seed, size, channels

    def images(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([shape_image(self.seed, int(i), self.size, self.channels) for i in indices])

    def held_out(self, count: int) -> np.ndarray:
        return np.stack([shape_image(self.seed + EVAL_SEED_OFFSET, i, self.size, self.channels) for i in range(count)])


class FileStream:
    """Image files visited in a fresh seeded permutation every epoch. An unreadable file is
    reported once and replaced by the next readable file of the same permutation, so a bad
    JPEG never stops a run and the stream stays a pure function of (seed, index)."""

    def __init__(self, paths: Sequence[str], eval_paths: Sequence[str], seed: int, size: int, channels: int,
                 threads: int = 4):
        if not paths:
            raise UsageError("no training images found; check train.data (a MIMIC-CXR-JPG layout root)")
        self.paths, self.eval_paths = list(paths), list(eval_paths)
        self.seed, self.size, self.channels = seed, size, channels
        self.bad: dict[str, str] = {}
        self._perms: dict[int, np.ndarray] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)

    def _order(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:  # keep this epoch and the previous one (a batch may straddle them)
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
            self._perms = {**{e: p for e, p in self._perms.items() if e == epoch - 1}, epoch: perm}
        return perm

    def _load(self, index: int) -> np.ndarray:
        n = len(self.paths)
        epoch, pos = divmod(index, n)
        order = self._order(epoch)
        for k in range(n):
            path = self.paths[order[(pos + k) % n]]
            if path in self.bad:
                continue
            try:
                return image_io.load_image(path, self.size, self.channels)
            except image_io.ImageError as e:
                self.bad[path] = str(e)
                print(f"skipping unreadable training image: {e}", file=sys.stderr)
        raise UsageError("every training image is unreadable; check train.data")

    def images(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack(list(self._pool.map(self._load, [int(i) for i in indices])))

    def held_out(self, count: int) -> np.ndarray:
        out = []
        for path in self.eval_paths:
            if len(out) == count:
                break
            try:
                out.append(image_io.load_image(path, self.size, self.channels))
            except image_io.ImageError as e:
                self.bad[path] = str(e)
        if len(out) < count:
            raise UsageError(f"need {count} readable held-out images (validate/test split) for evaluation, "
                             f"found {len(out)}; lower train.grid_images or add images")
        return np.stack(out)


def corpus_image_paths(root: str) -> tuple[list[str], list[str]]:
    """A MIMIC-CXR-JPG layout root -> (train-split image paths, validate/test image paths).

    The VQ-GAN learns every view; held-out images are the evaluation selection (frontal,
    earliest study) so the grids show the images the LM will be scored on.
    """
    from llmcxr_jax.data import mimic_cxr

    corpus = mimic_cxr.load_corpus(root, progress=False)
    train = [r.image_path for r in corpus.records if r.split == "train"]
    held_out = [r.image_path for r in corpus.evaluation] or \
        [r.image_path for r in corpus.records if r.split in mimic_cxr.EVAL_SPLITS]
    return train, held_out
