"""PyTorch weights of the frozen perceptual networks -> our arrays -> one safetensors file:
torchvision VGG16 + lpips lin heads (or the LPIPS inside a taming .ckpt) and torchxrayvision's
DenseNet-121. torch files are read with weights_only=True: nothing in them is executed.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.models.perceptual import (
    _HWIO_TO_OIHW,
    _OIHW_TO_HWIO,
    LPIPS,
    TAMING_LPIPS_PREFIX,
    DenseNet,
    LPIPSConfig,
    txv_densenet121,
)

# ---------------------------------------------------------------------------------------------
# weights: torch state dicts <-> our arrays ("features.0.kernel", "denseblock1.denselayer1.norm1.scale")

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "running_mean": "running_mean",
                  "running_var": "running_var"}


def _flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def _shapes(make: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.get_value().shape) for k, v in _flat_variables(nnx.eval_shape(make)).items()}


def _lpips_source(key: str) -> tuple[str, str]:
    """Our LPIPS key -> (which torch state dict, its key there)."""
    head, leaf = key.rsplit(".", 1)
    if head.startswith("lin"):
        return "lin", f"{head}.model.1.weight"
    return "vgg16", f"{head}.{_LEAF_TO_TORCH[leaf]}"


def _txv_key(key: str) -> str:
    head, leaf = key.rsplit(".", 1)
    return f"features.{head}.{_LEAF_TO_TORCH[leaf]}"


def _from_torch(shapes: Mapping[str, tuple], torch_key: Callable[[str], str], sd: Mapping[str, Any],
                what: str) -> dict[str, np.ndarray]:
    out = {}
    for key, shape in shapes.items():
        tk = torch_key(key)
        if tk not in sd:
            raise UsageError(f"{what} lacks {tk!r}")
        value = np.asarray(sd[tk], dtype=np.float32)
        kernel = key.endswith(".kernel")
        want = tuple(shape[i] for i in _HWIO_TO_OIHW) if kernel else shape
        if value.shape != want:
            raise UsageError(f"{what} {tk!r} has shape {value.shape}, expected {want}")
        out[key] = np.ascontiguousarray(value.transpose(_OIHW_TO_HWIO) if kernel else value)
    return out


def _refuse_unexpected(sd: Mapping[str, Any], expected: set[str], scope: Callable[[str], bool], what: str) -> None:
    extra = sorted(k for k in sd if scope(k) and k not in expected)
    if extra:
        raise UsageError(f"{what} has unexpected {extra[0]!r} ({len(extra)} unexpected); is it the right network?")


def _to_torch(arrays: Mapping[str, np.ndarray], torch_key: Callable[[str], str]) -> dict[str, np.ndarray]:
    return {torch_key(k): np.ascontiguousarray(np.transpose(v, _HWIO_TO_OIHW) if k.endswith(".kernel") else v)
            for k, v in arrays.items()}


def _lpips_shapes() -> dict[str, tuple[int, ...]]:
    return _shapes(lambda: LPIPS(LPIPSConfig(dtype="float32", param_dtype="float32"), rngs=None))


def _txv_shapes() -> dict[str, tuple[int, ...]]:
    return _shapes(lambda: DenseNet(txv_densenet121(dtype="float32", param_dtype="float32"), rngs=None))


def convert_lpips(vgg16_state_dict: Mapping[str, Any], lin_state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torchvision vgg16 state dict (features.N.weight/bias; classifier.* ignored) + lpips'
    weights/v0.1/vgg.pth (linK.model.1.weight) -> our float32 arrays. ValueError names a missing,
    unexpected or misshapen key."""
    shapes = _lpips_shapes()
    out = {}
    for which, sd, what, scope in (("vgg16", vgg16_state_dict, "vgg16 state dict", lambda k: k.startswith("features.")),
                                   ("lin", lin_state_dict, "LPIPS lin state dict", lambda k: k.startswith("lin"))):
        part = {k: s for k, s in shapes.items() if _lpips_source(k)[0] == which}
        source = lambda k: _lpips_source(k)[1]  # noqa: E731
        _refuse_unexpected(sd, {source(k) for k in part}, scope, what)
        out.update(_from_torch(part, source, sd, what))
    return out


def lpips_torch_state_dicts(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inverse of convert_lpips: (vgg16 `features.*` state dict, lpips lin state dict)."""
    torch_sd = _to_torch(arrays, lambda k: _lpips_source(k)[1])
    lin = {k: v for k, v in torch_sd.items() if k.startswith("lin")}
    return {k: v for k, v in torch_sd.items() if k not in lin}, lin


def split_taming_lpips(state_dict: Mapping[str, Any], prefix: str = TAMING_LPIPS_PREFIX
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A taming / LLM-CXR VQ-GAN state dict, which carries its LPIPS under `prefix`
    (net.sliceS.N.weight, linK.model.1.weight) -> (vgg16 state dict, lin state dict) for convert_lpips."""
    vgg, lin = {}, {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):].split(".")
        if rest[0] == "net" and len(rest) == 4:  # net.slice1.0.weight: torchvision index kept
            vgg[f"features.{rest[2]}.{rest[3]}"] = value
        elif rest[0].startswith("lin"):
            lin[".".join(rest)] = value
    if not vgg or not lin:
        raise UsageError(f"state dict has no LPIPS network and lin heads under {prefix!r}")
    return vgg, lin


def convert_txv_densenet(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torchxrayvision DenseNet-121 state dict -> our float32 arrays. Only features.* is used
    (classifier.*, op_threshs and num_batches_tracked are ignored); ValueError names a missing,
    unexpected or misshapen key."""
    shapes = _txv_shapes()
    what = "torchxrayvision DenseNet state dict"
    _refuse_unexpected(state_dict, {_txv_key(k) for k in shapes},
                       lambda k: k.startswith("features.") and not k.endswith(".num_batches_tracked"), what)
    return _from_torch(shapes, _txv_key, state_dict, what)


def txv_densenet_torch_state_dict(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of convert_txv_densenet (features.* only; load into torch with strict=False)."""
    return _to_torch(arrays, _txv_key)


def to_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """Our arrays (float32 numpy, our layout) of a model: what save_weights writes."""
    return {k: np.array(jax.device_get(v.get_value()), np.float32) for k, v in _flat_variables(model).items()}


def save_weights(arrays: Mapping[str, np.ndarray], path: str) -> None:
    """One safetensors file of our arrays (from convert_lpips / convert_txv_densenet / to_arrays)."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, path,
              metadata={"format": "llmcxr-perceptual"})


def _load(make: Callable[[], nnx.Module], path: str, missing_hint: str) -> Any:
    """Build the model abstractly (no init work) and fill every variable from the file."""
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise MissingInputError(missing_hint)
    arrays = load_file(path)
    model = nnx.eval_shape(make)
    variables = _flat_variables(model)
    missing, unexpected = sorted(set(variables) - set(arrays)), sorted(set(arrays) - set(variables))
    if missing or unexpected:
        bad = f"lacks {missing[0]!r}" if missing else f"has unexpected {unexpected[0]!r}"
        raise UsageError(f"{path} {bad} ({len(missing)} missing, {len(unexpected)} unexpected); convert it again")
    for key, var in variables.items():
        if arrays[key].shape != var.get_value().shape:
            raise UsageError(f"{path}: {key!r} has shape {arrays[key].shape}, expected {var.get_value().shape}")
        var.set_value(jnp.asarray(arrays[key], var.get_value().dtype))
    return model


def load_lpips(path: str, cfg: LPIPSConfig) -> LPIPS:
    hint = (f"LPIPS weights {path} not found; convert them once with `llmcxr convert-weights lpips "
            f"--vgg16 VGG16.pth --lin vgg.pth --out {path}`")
    return _load(lambda: LPIPS(cfg, rngs=None), path, hint)


def load_txv_densenet(path: str, *, dtype: str, param_dtype: str) -> DenseNet:
    hint = (f"CIP DenseNet weights {path} not found; convert them once with `llmcxr convert-weights txv "
            f"--state-dict DENSENET.pth --out {path}` (DENSENET.pth: torch.save(xrv.models.DenseNet("
            f"weights='densenet121-res224-all').state_dict(), 'DENSENET.pth'))")
    return _load(lambda: DenseNet(txv_densenet121(dtype, param_dtype), rngs=None), path, hint)
