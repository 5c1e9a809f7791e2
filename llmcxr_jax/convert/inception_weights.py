"""torch-fidelity's FID Inception weights (weights-inception-2015-12-05-6726825d.pth, a state dict of
FeatureExtractorInceptionV3) <-> the arrays of models/inception.py. The file is read by torch_files'
safe reader (nothing in it runs); nothing is downloaded: the user supplies the file.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax.convert.torch_files import read_torch_state_dict
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.models.inception import InceptionV3

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch-fidelity's release asset (v0.2.0), the file the user downloads themselves
WEIGHTS_SOURCE = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
# in the file, not used for pool3 features: the 1008-way logits layer and BatchNorm's step counters
UNUSED_KEYS = ("fc.weight", "fc.bias")
_UNUSED_SUFFIX = ".num_batches_tracked"
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "running_mean": "running_mean",
                  "running_var": "running_var"}
_HWIO_TO_OIHW = (3, 2, 0, 1)
_OIHW_TO_HWIO = (2, 3, 1, 0)


def _variables(model: InceptionV3) -> dict[str, nnx.Variable]:
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def torch_key(key: str) -> str:
    """Our key (Mixed_5b.branch1x1.conv.kernel) -> torch-fidelity's (Mixed_5b.branch1x1.conv.weight)."""
    head, leaf = key.rsplit(".", 1)
    return f"{head}.{_LEAF_TO_TORCH[leaf]}"


def _abstract() -> InceptionV3:
    return nnx.eval_shape(lambda: InceptionV3())


def convert_inception(state_dict: Mapping[str, Any], what: str = "Inception state dict") -> dict[str, np.ndarray]:
    """FeatureExtractorInceptionV3 state dict -> our float32 arrays (conv kernels OIHW -> HWIO).
    fc.* and num_batches_tracked are ignored; a missing, unexpected or misshapen key is a one-line
    UsageError naming it."""
    variables = _variables(_abstract())
    expected = {torch_key(k): k for k in variables}
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict
                        if k not in expected and k not in UNUSED_KEYS and not k.endswith(_UNUSED_SUFFIX))
    if missing or unexpected:
        parts = ([f"lacks {len(missing)} key(s), e.g. {missing[0]!r}"] if missing else []) + \
                ([f"has {len(unexpected)} unexpected key(s), e.g. {unexpected[0]!r}"] if unexpected else [])
        raise UsageError(f"{what} {' and '.join(parts)}; give torch-fidelity's FID Inception weights ({WEIGHTS_FILE})")
    out = {}
    for tk, key in expected.items():
        value = np.asarray(state_dict[tk], np.float32)
        kernel = key.endswith(".kernel")
        shape = tuple(variables[key].get_value().shape)
        want = tuple(shape[i] for i in _HWIO_TO_OIHW) if kernel else shape
        if value.shape != want:
            raise UsageError(f"{what} {tk!r} has shape {value.shape}, expected {want}")
        out[key] = np.ascontiguousarray(value.transpose(_OIHW_TO_HWIO) if kernel else value)
    return out


def inception_torch_state_dict(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of convert_inception (without fc.*: torch-fidelity's strict load needs those added)."""
    return {torch_key(k): np.ascontiguousarray(np.transpose(v, _HWIO_TO_OIHW) if k.endswith(".kernel") else v)
            for k, v in arrays.items()}


def inception_arrays(model: InceptionV3) -> dict[str, np.ndarray]:
    """A model's arrays (float32 numpy, our keys): what convert_inception returns."""
    return {k: np.array(v.get_value(), np.float32) for k, v in _variables(model).items()}


def load_inception_model(path: str) -> InceptionV3:
    """The FID Inception from the user's torch-fidelity weights file (float32, every variable filled)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"Inception weights {path} not found; give torch-fidelity's {WEIGHTS_FILE} "
                                f"(download it yourself from {WEIGHTS_SOURCE})")
    arrays = convert_inception(read_torch_state_dict(path, "Inception weights"), f"Inception weights {path}")
    model = _abstract()
    for key, var in _variables(model).items():
        var.set_value(jnp.asarray(arrays[key]))
    return model
