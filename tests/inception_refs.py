"""The reference FID Inception for tests: torch-fidelity's own feature_extractor_inceptionv3.py (installed
with --no-deps), loaded by path beside a bare stand-in for its package, whose __init__ imports torchvision
(not installable beside this torch); and random weights in its state-dict layout.
"""
from __future__ import annotations

import importlib.util
import os
import types

import numpy as np
import perceptual_refs as refs

from llmcxr_jax.convert import inception_weights as W
from llmcxr_jax.models.inception import InceptionV3

_MODULES: dict[str, types.ModuleType] = {}
FC_CLASSES = 1008  # the 2015 graph's logits layer, in the file but not in our port


def fidelity_inception() -> types.ModuleType:
    """torch_fidelity/feature_extractor_inceptionv3.py as a module. Its siblings (feature_extractor_base,
    helpers, interpolate_compat_tensorflow, defaults, deprecations) import for real; the package
    __init__ (metrics, datasets: torchvision) never runs. sys.modules is restored afterwards."""
    if "inception" in _MODULES:
        return _MODULES["inception"]
    spec = importlib.util.find_spec("torch_fidelity")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torch_fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
    where = list(spec.submodule_search_locations)
    package = types.ModuleType("torch_fidelity")
    package.__path__ = where
    siblings = tuple(f"torch_fidelity.{n}" for n in ("feature_extractor_base", "helpers", "defaults", "deprecations",
                                                      "interpolate_compat_tensorflow"))
    with refs._stand_in_modules({"torch_fidelity": package}, created=siblings):
        path = os.path.join(where[0], "feature_extractor_inceptionv3.py")
        module_spec = importlib.util.spec_from_file_location("torch_fidelity_feature_extractor_inceptionv3", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    _MODULES["inception"] = module
    return module


def fidelity_interpolate():
    """torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x, from its file (it imports only torch)."""
    if "interpolate" not in _MODULES:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("torch_fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
        path = os.path.join(list(spec.submodule_search_locations)[0], "interpolate_compat_tensorflow.py")
        module_spec = importlib.util.spec_from_file_location("torch_fidelity_interpolate_compat_tensorflow", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _MODULES["interpolate"] = module
    return _MODULES["interpolate"].interpolate_bilinear_2d_like_tensorflow1x


def random_inception_state_dict(seed: int) -> dict[str, np.ndarray]:
    """torch-fidelity's state-dict layout (fc.* included) with random values: kaiming-normal (fan_in)
    conv kernels, BatchNorm affine and running statistics near identity. Needs no torch."""
    rng = np.random.default_rng(seed)
    zeros = W.inception_torch_state_dict(W.inception_arrays(InceptionV3()))
    out = {}
    for key, z in zeros.items():
        if z.ndim == 4:  # [out, in, kh, kw]
            value = rng.standard_normal(z.shape) * np.sqrt(2.0 / np.prod(z.shape[1:]))
        elif key.endswith(("bn.weight", "running_var")):
            value = rng.uniform(0.5, 1.5, z.shape)
        else:  # bn.bias, running_mean
            value = 0.1 * rng.standard_normal(z.shape)
        out[key] = value.astype(np.float32)
    out["fc.weight"] = (0.02 * rng.standard_normal((FC_CLASSES, 2048))).astype(np.float32)
    out["fc.bias"] = np.zeros(FC_CLASSES, np.float32)
    return out


def save_state_dict(state_dict: dict[str, np.ndarray], path: str) -> str:
    """torch.save of the arrays as tensors, as torch-fidelity's weights file is written."""
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, path)
    return path
