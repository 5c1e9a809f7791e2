"""Run files on a local disk or in a bucket (gs://...): every workdir file goes through etils.epath, which is
pathlib locally and gcsfs (or TensorFlow) for gs://. Bucket objects cannot be appended to, so
`AppendOnlyFile` rewrites them whole.
"""
from __future__ import annotations

import functools
import importlib.util
import os

from etils import epath

from llmcxr_jax.errors import UsageError


def is_remote(p) -> bool:
    """gs://, s3:// and the other URLs epath knows; anything else is a local path."""
    return "://" in os.fspath(p)


def path(p) -> epath.Path:
    """epath.Path of `p`; a local one made absolute (orbax wants absolute checkpoint directories)."""
    p = os.fspath(p)
    if not is_remote(p):
        return epath.Path(os.path.abspath(p))
    require_packages(p.split("://", 1)[0])
    return epath.Path(p)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package
        return False


@functools.cache
def require_packages(scheme: str) -> None:
    """gs:// needs a filesystem for epath (gcsfs, or TensorFlow's) and google-cloud-storage, which orbax asks
    whether a bucket has a hierarchical namespace; neither is a dependency of a local run."""
    if scheme != "gs":
        return
    missing = [] if _installed("gcsfs") or _installed("tensorflow") else ["gcsfs"]
    missing += [] if _installed("google.cloud.storage") else ["google-cloud-storage"]
    if missing:
        raise UsageError(f"gs:// paths need {' and '.join(missing)}; pip install {' '.join(missing)} (or "
                         "llmcxr-jax[gcs]) on every host")


class AppendOnlyFile:
    """A text log that only grows (metrics.jsonl). Locally each `append` opens it in append mode; in a bucket the
    whole object is rewritten from a copy kept here (read once, if it exists), which costs O(file size) per
    append: fine for logs written every few steps, a few MB over a run. (TensorBoard event files: train/tensorboard.)"""

    def __init__(self, p):
        self.path = path(p)
        self._remote = is_remote(p)
        self._content: str | None = None

    def append(self, data: str) -> None:
        if not self._remote:
            with self.path.open("a") as f:
                f.write(data)
            return
        if self._content is None:
            self._content = self.path.read_text() if self.path.exists() else ""
        self._content += data
        self.path.write_text(self._content)
